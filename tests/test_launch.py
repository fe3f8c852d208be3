"""The launch files parse: YAML, Accelerate's own config loader, and ``bash -n`` for the Slurm script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

LAUNCH = Path(__file__).resolve().parents[1] / "launch"

EXPECTED = {  # file: (distributed type, processes, machines, cpu)
    "accelerate_1gpu.yaml": (DistributedType.NO, 1, 1, False),
    "accelerate_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, False),
    "accelerate_2x8gpu.yaml": (DistributedType.MULTI_GPU, 16, 2, False),
    "accelerate_cpu2.yaml": (DistributedType.MULTI_GPU, 2, 1, False),  # torchrun launcher; cpu=True when no CUDA
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_parse(name):
    path = LAUNCH / name
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    kind, processes, machines, cpu = EXPECTED[name]
    assert (config.distributed_type, config.num_processes, config.num_machines, config.use_cpu) == \
        (kind, processes, machines, cpu)
    if machines > 1:
        assert config.main_process_ip and config.main_process_port


def test_slurm_script_is_valid_bash():
    script = LAUNCH / "slurm_2x8.sh"
    bash = shutil.which("bash")
    assert bash, "bash not found"
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "accelerate launch" in text and "SLURM_NODEID" in text
    assert "accelerate_2x8gpu.yaml" in text and "-m stepwise.run" in text
