"""`exit_on_signals`: SIGTERM inside the block exits through `finally` clauses, also
when the handler's SystemExit is swallowed because the signal landed in a finalizer."""
import os
import signal

import pytest

from tip_megatron.runtime.signals import exit_if_signalled, exit_on_signals


def test_sigterm_raises_system_exit_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(SystemExit) as exc:
        with exit_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at the next bytecode check
                    pass
            finally:
                cleaned.append(True)
    assert exc.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


class _SignalsInFinalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, inside __del__: its exception is ignored
            pass


_SWALLOWED = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_SWALLOWED
def test_a_signal_whose_exception_a_finalizer_swallowed_still_exits():
    reached = []
    with pytest.raises(SystemExit) as exc:
        with exit_on_signals():
            _SignalsInFinalizer()  # dropped at once
            reached.append(True)  # the block went on: Python ignored the exception
            exit_if_signalled()  # where a waiting loop checks
            reached.append("after")
    assert reached == [True] and exc.value.code == 128 + signal.SIGTERM
    exit_if_signalled()  # delivered once: nothing pending any more


@_SWALLOWED
def test_the_block_end_raises_a_swallowed_signal():
    with pytest.raises(SystemExit) as exc:
        with exit_on_signals():
            _SignalsInFinalizer()
    assert exc.value.code == 128 + signal.SIGTERM
