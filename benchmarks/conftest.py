"""Records the torch version and thread count with pytest-benchmark's machine info."""

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
