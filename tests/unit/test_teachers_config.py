"""`teachers:` and routing: one-line refusals, the warning for a teacher that serves
nothing, and the route table against what each teacher lists."""
import pytest

from tip_megatron.config import load_config, validate_run
from tip_megatron.distill.routing import route_table, teacher_ids_of_rows
from tip_megatron.distill.teacher_config import (
    TeacherConfig, separate_teachers, teacher_ranks, teacher_split,
)
from tip_megatron.runtime.parallel import Split

A = "{name: a, builtin: quickstart-teacher, serves: [a]}"
B = "{name: b, builtin: quickstart-teacher, serves: [b]}"
SEPARATE_AB = ("teachers=[{name: a, builtin: quickstart-teacher, serves: [a], placement: separate}, "
               "{name: b, builtin: quickstart-teacher, serves: [b], placement: separate, "
               "parallel: {tp: 2}}]")


def _cfg(*extra):
    return load_config(None, ["student.builtin=quickstart-student", "data.prompts=[p.jsonl]", *extra])


@pytest.mark.parametrize("overrides,message", [
    ([f"teachers=[{A}, {B}]", "teacher.builtin=quickstart-teacher", "data.route_field=domain"],
     r"both `teacher:` and `teachers:` are set"),
    ([f"teachers=[{A}, {B}]"], r"teachers: 2 teachers need data.route_field"),
    ([f"teachers=[{A}, {{name: b, builtin: quickstart-teacher, serves: [a]}}]", "data.route_field=d"],
     r"route value 'a' is served by both 'a' and 'b'"),
    ([SEPARATE_AB, "data.route_field=d"],
     r"teachers \['a', 'b'\] with placement=separate take 3 ranks \(teacher tp x pp x dp\) of a world of "
     r"3: none left for the student"),
    ([f"teachers=[{A}, {{name: b, builtin: quickstart-teacher, serves: [b], signal: topk}}]",
      "data.route_field=d"], r"signal=topk is a single-teacher comparison mode"),
    (["teachers=[{name: 'a b', builtin: quickstart-teacher}]"], r"teachers\[0\].name='a b'"),
    ([f"teachers=[{{name: a, serves: [a]}}, {B}]", "data.route_field=d"], r"^teachers\[0\]"),
    ([f"teachers=[{A}, {B}]", "data.route_field=d", "data.prompts=[]"],
     r"several teachers route prompt records by data.route_field: name prompt files in data.prompts"),
])
def test_bad_teachers_config_is_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        validate_run(_cfg(*overrides), world_size=3 if SEPARATE_AB in overrides else 1)
    assert "\n" not in str(err.value)


def test_teachers_on_ranks_of_their_own_follow_the_student_in_config_order():
    """Two `separate` teachers (1 and 2 ranks) after a student of 2, a `shared` one between
    them in the list: the config's split gives each world its ranks, in list order."""
    cfg = _cfg("teachers=[{name: a, builtin: quickstart-teacher, serves: [a], placement: separate}, "
               "{name: s, builtin: quickstart-teacher, serves: [s]}, "
               "{name: b, builtin: quickstart-teacher, serves: [b], placement: separate, "
               "parallel: {tp: 2}}]", "data.route_field=d")
    validate_run(cfg, world_size=5)
    assert teacher_ranks(cfg) == 3 and separate_teachers(cfg) == [0, 2]
    split = teacher_split(cfg, 5)
    assert split == Split(2, (1, 2))
    assert [split.world(r) for r in range(5)] == [-1, -1, 0, 1, 1]
    assert [split.role(r) for r in range(5)] == ["student"] * 2 + ["teacher"] * 3
    assert [split.offset(w) for w in (-1, 0, 1)] == [0, 2, 3]
    assert [split.size(w) for w in (-1, 0, 1)] == [2, 1, 2]
    assert teacher_split(_cfg(f"teachers=[{A}, {B}]", "data.route_field=d"), 4) is None
    with pytest.raises(ValueError, match="rank 5 is outside a job of 2 student ranks"):
        split.world(5)


def test_a_teacher_serving_nothing_is_warned_about():
    with pytest.warns(UserWarning, match="'c' serves no route value and is not the default"):
        validate_run(_cfg(f"teachers=[{A}, {B}, {{name: c, builtin: quickstart-teacher}}]",
                          "data.route_field=d"), world_size=1)


def test_a_list_of_one_serves_everything(recwarn):
    validate_run(_cfg("teachers=[{name: only, builtin: quickstart-teacher}]"), world_size=1)
    assert not [w for w in recwarn if "serves no route value" in str(w.message)]
    assert route_table([TeacherConfig(builtin="x")], {"math": "f, line 1", "code": "f, line 2"}) == \
        {"math": 0, "code": 0}


def test_route_table_against_the_lists():
    teachers = [TeacherConfig(name="m", builtin="x", serves=("math",)),
                TeacherConfig(name="c", builtin="x", serves=("code", "sql"), default=True)]
    where = {"math": "p.jsonl, line 1", "sql": "p.jsonl, line 2", "bio": "p.jsonl, line 9"}
    assert route_table(teachers, where) == {"math": 0, "sql": 1, "bio": 1}
    no_default = [teachers[0], TeacherConfig(name="c", builtin="x", serves=("code",))]
    with pytest.raises(ValueError, match=r"^p.jsonl, line 9: route value 'bio' \(data.route_field\) "
                                         r"is served by no teacher .*m: \['math'\], c: \['code'\]"):
        route_table(no_default, {"math": "p.jsonl, line 1", "bio": "p.jsonl, line 9"})
    assert teacher_ids_of_rows([1, 0], 3).tolist() == [1, 1, 1, 0, 0, 0]


def test_the_two_teacher_example_places_its_ranks_as_its_comment_says():
    """examples/configs/qwen3_math_code_teachers.yaml: ranks 0-3 student, 4-5 math, 6-7 code."""
    from pathlib import Path

    from tip_megatron.config import student_world_size

    path = Path(__file__).parents[2] / "examples" / "configs" / "qwen3_math_code_teachers.yaml"
    cfg = load_config(str(path))
    assert teacher_ranks(cfg) == 4 and student_world_size(cfg, 8) == 4
    split = teacher_split(cfg, 8)
    assert [split.offset(w) for w in range(2)] == [4, 6] and split.teachers == (2, 2)
