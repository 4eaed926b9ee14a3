"""How medjax.distributed decides to start jax.distributed (pure planning; no processes)."""
import pytest

from medjax.config import MeshSection
from medjax.distributed import initialize, plan_launch


def test_single_process_is_a_noop():
    assert plan_launch(None, {}).kind == "single"
    assert initialize(None, {}).kind == "single"
    assert plan_launch(None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).kind == "single"
    assert plan_launch(None, {"TPU_WORKER_HOSTNAMES": "t1v-0"}).kind == "single"


def test_explicit_env_and_config():
    env = {"MEDJAX_COORDINATOR": "10.0.0.1:1234", "MEDJAX_NUM_PROCESSES": "4",
           "MEDJAX_PROCESS_ID": "2", "MEDJAX_LOCAL_DEVICE_IDS": "0,1"}
    plan = plan_launch(None, env)
    assert (plan.kind, plan.coordinator, plan.num_processes, plan.process_id,
            plan.local_device_ids) == ("explicit", "10.0.0.1:1234", 4, 2, (0, 1))
    cfg = MeshSection(coordinator="h0:99", num_processes=2, process_id=1)
    plan = plan_launch(cfg, env)           # config wins over env
    assert (plan.coordinator, plan.num_processes, plan.process_id) == ("h0:99", 2, 1)
    with pytest.raises(ValueError, match="missing: \\['process_id'\\]"):
        plan_launch(None, {"MEDJAX_COORDINATOR": "h:1", "MEDJAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="process_id 5 must be in"):
        plan_launch(None, {**env, "MEDJAX_PROCESS_ID": "5"})
    with pytest.raises(ValueError, match="MEDJAX_NUM_PROCESSES='two'"):
        plan_launch(None, {**env, "MEDJAX_NUM_PROCESSES": "two"})


def test_cluster_auto_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_GPUS_ON_NODE": "8"}
    plan = plan_launch(None, slurm)
    assert (plan.kind, plan.source, plan.local_device_ids) == ("auto", "slurm", tuple(range(8)))
    per_gpu = {**slurm, "SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8"}
    assert plan_launch(None, per_gpu).local_device_ids is None   # JAX uses SLURM_LOCALID
    tpu = plan_launch(None, {"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"})
    assert (tpu.kind, tpu.source) == ("auto", "tpu")
    assert plan_launch(None, {"MEDJAX_DISTRIBUTED": "auto"}).kind == "auto"
    assert plan_launch(None, {**slurm, "MEDJAX_DISTRIBUTED": "0"}).kind == "single"
