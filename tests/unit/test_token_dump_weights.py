"""Token dumps carry each token's loss weight (`weight`): written and read back, `kept` as
0/1 when no weight is given, and older dumps without the column read with that default."""
import numpy as np
import pytest

from tip_megatron.train.dump_file import TokenDump, read_token_dump, write_token_dump


def _dump(**extra):
    kept = np.array([True, False, True, True])
    return TokenDump(entropy_norm=np.array([0.1, 0.2, 0.3, 0.4]), reverse_kl=np.ones(4),
                     forward_kl=np.ones(4), kept=kept, quadrant=np.array([1, 2, 3, 4]),
                     rollout_id=np.arange(4), position=np.zeros(4), step=3, **extra)


def test_weights_round_trip(tmp_path):
    path = write_token_dump(tmp_path / "a.npz", _dump(weight=np.array([1.0, 0.0, 0.25, 0.5])))
    np.testing.assert_array_equal(read_token_dump(path).weight, np.float32([1.0, 0.0, 0.25, 0.5]))


def test_default_weight_is_kept_and_old_dumps_read(tmp_path):
    d = _dump()
    np.testing.assert_array_equal(d.weight, np.float32([1, 0, 1, 1]))
    path = write_token_dump(tmp_path / "b.npz", d)
    with np.load(path) as data:  # a dump written before the weight column existed
        old = {k: data[k] for k in data.files if k != "weight"}
    np.savez_compressed(tmp_path / "old.npz", **old)
    np.testing.assert_array_equal(read_token_dump(tmp_path / "old.npz").weight, np.float32([1, 0, 1, 1]))


def test_weight_length_checked():
    with pytest.raises(ValueError, match="differ in length"):
        _dump(weight=np.ones(3))
