"""runtime_env end to end: a task or actor run on a `latticaray start` node gets its env_vars,
and its working_dir / py_modules fetched there by CID from the driver's store; every option is
applied or refused when it is given."""

from __future__ import annotations

import os

import pytest

import latticaray as lattica
from tests.runtime.test_placement_groups_mesh import started_mesh

pytestmark = pytest.mark.timeout(180)


@lattica.remote(num_cpus=1)
def inspect_env():
    import shardmod

    with open("config.txt") as f:
        config = f.read()
    return (
        lattica.get_runtime_context().node_id,
        os.environ.get("STAGE"),
        config,
        shardmod.VALUE,
    )


@lattica.remote(num_cpus=1)
def plain():
    return os.environ.get("STAGE"), "shardmod" in __import__("sys").modules


@lattica.remote(num_cpus=0)
class EnvActor:
    def stage(self):
        return os.environ.get("STAGE"), lattica.get_runtime_context().node_id


@pytest.fixture(scope="module")
def node():
    with started_mesh(1, "--num-cpus", "1") as nodes:
        yield nodes[0]


def test_working_dir_py_modules_and_env_vars_reach_a_remote_executor(node, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.txt").write_text("layers=4")
    mods = tmp_path / "mods" / "shardmod"
    mods.mkdir(parents=True)
    (mods / "__init__.py").write_text("VALUE = 'from the package'\n")
    env = {"env_vars": {"STAGE": "two"}, "working_dir": str(work), "py_modules": [str(mods)]}
    ran = lattica.get(inspect_env.options(runtime_env=env).remote(), timeout=90)
    assert ran == (node.node_id, "two", "layers=4", "from the package")
    # the pooled worker is put back: a task without the environment sees none of it
    assert lattica.get(plain.remote(), timeout=60)[0] is None
    actor = EnvActor.options(
        runtime_env={"env_vars": {"STAGE": "actor"}},
        scheduling_strategy=lattica.NodeAffinitySchedulingStrategy(node.node_id),
    ).remote()
    assert lattica.get(actor.stage.remote(), timeout=60) == ("actor", node.node_id)
    lattica.kill(actor)


def test_unsupported_options_are_refused_when_given(node):
    with pytest.raises(ValueError, match="conda"):
        plain.options(runtime_env={"conda": "env"})
    with pytest.raises(ValueError, match="pip"):
        plain.options(runtime_env={"pip": ["requests"]})
    with pytest.raises(ValueError, match="not supported"):
        plain.options(runtime_env={"image_uri": "x"})
    with pytest.raises(ValueError, match="working_dir"):
        plain.options(runtime_env={"working_dir": "/no/such/dir"})
    with pytest.raises(ValueError, match="label_selector"):
        plain.options(label_selector={"zone": "a"})
    with pytest.raises(ValueError, match="concurrency_group"):
        lattica.method(concurrency_group="io")
    actor = EnvActor.remote()
    with pytest.raises(ValueError, match="not supported"):
        actor.stage.options(name="x")
    with pytest.raises(ValueError, match="unknown option"):
        plain.options(no_such_option=1)
    lattica.kill(actor)
