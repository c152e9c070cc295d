"""Cluster settings of the GPU steps, read when the pipeline is compiled (environment overrides).

GDRT_ACCELERATOR       accelerator resource (default nvidia.com/gpu)
GDRT_GPU_NODE_SELECTOR node label key=value for GPU nodes (default nvidia.com/gpu.present=true)
GDRT_GPU_TOLERATION    taint key tolerated on GPU nodes (default nvidia.com/gpu)
GDRT_SHM_SIZE          size of the memory-backed /dev/shm of training pods (default 16Gi)
GDRT_TRAIN_CPU / GDRT_TRAIN_MEMORY   limits of the training pod (default 8 / 64G)
GDRT_CACHE_PVC         PVC mounted at /mnt/gdrt on training pods: checkpoints and the Hugging Face
                       cache of base models (default gdrt-cache; "" = none)
"""

import os

ACCELERATOR = os.environ.get("GDRT_ACCELERATOR", "nvidia.com/gpu")
NODE_SELECTOR = os.environ.get("GDRT_GPU_NODE_SELECTOR", "nvidia.com/gpu.present=true")
TOLERATION_KEY = os.environ.get("GDRT_GPU_TOLERATION", "nvidia.com/gpu")
SHM_SIZE = os.environ.get("GDRT_SHM_SIZE", "16Gi")
TRAIN_CPU = os.environ.get("GDRT_TRAIN_CPU", "8")
TRAIN_MEMORY = os.environ.get("GDRT_TRAIN_MEMORY", "64G")
CACHE_PVC = os.environ.get("GDRT_CACHE_PVC", "gdrt-cache")
CACHE_MOUNT = "/mnt/gdrt"  # PVC: checkpoints and the Hugging Face cache of base models
