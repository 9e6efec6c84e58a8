"""The FOCUS attention backend (backend.py) and its two op sets: the Triton/CUDA path
(triton_path.py) and the CPU path (vllm_focus.kernels.cpu), one interface (docs/design.md)."""
