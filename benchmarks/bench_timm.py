"""End-to-end benchmark: GTP-patched timm ViT vs the unpatched model (see
gtp_kernels/benchmark/end_to_end.py; also installed as the `gtp-bench` command)."""

from gtp_kernels.benchmark.end_to_end import main

if __name__ == "__main__":
    main()
