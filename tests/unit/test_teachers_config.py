"""`teachers:` and routing: one-line refusals, the warning for a teacher that serves
nothing, and the route table against what each teacher lists."""
import pytest

from tip_megatron.config import load_config, validate_run
from tip_megatron.distill.routing import route_table, teacher_ids_of_rows
from tip_megatron.distill.teacher_config import TeacherConfig

A = "{name: a, builtin: quickstart-teacher, serves: [a]}"
B = "{name: b, builtin: quickstart-teacher, serves: [b]}"


def _cfg(*extra):
    return load_config(None, ["student.builtin=quickstart-student", "data.prompts=[p.jsonl]", *extra])


@pytest.mark.parametrize("overrides,message", [
    ([f"teachers=[{A}, {B}]", "teacher.builtin=quickstart-teacher", "data.route_field=domain"],
     r"both `teacher:` and `teachers:` are set"),
    ([f"teachers=[{A}, {B}]"], r"teachers: 2 teachers need data.route_field"),
    ([f"teachers=[{A}, {{name: b, builtin: quickstart-teacher, serves: [a]}}]", "data.route_field=d"],
     r"route value 'a' is served by both 'a' and 'b'"),
    ([f"teachers=[{{name: a, builtin: quickstart-teacher, serves: [a], placement: separate}}, "
      f"{{name: b, builtin: quickstart-teacher, serves: [b], placement: separate}}]", "data.route_field=d"],
     r"\['a', 'b'\] are all placement=separate; this version runs at most one"),
    ([f"teachers=[{A}, {{name: b, builtin: quickstart-teacher, serves: [b], signal: topk}}]",
      "data.route_field=d"], r"signal=topk is a single-teacher comparison mode"),
    ([f"teachers=[{{name: 'a b', builtin: quickstart-teacher}}]"], r"teachers\[0\].name='a b'"),
    ([f"teachers=[{{name: a, serves: [a]}}, {B}]", "data.route_field=d"], r"^teachers\[0\]"),
    ([f"teachers=[{A}, {B}]", "data.route_field=d", "data.prompts=[]"],
     r"several teachers route prompt records by data.route_field: name prompt files in data.prompts"),
])
def test_bad_teachers_config_is_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        validate_run(_cfg(*overrides), world_size=1)
    assert "\n" not in str(err.value)


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
