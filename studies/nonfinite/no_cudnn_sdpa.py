"""Run a script with PyTorch's cuDNN attention backend switched off (flash / memory-efficient / math stay):
python studies/nonfinite/no_cudnn_sdpa.py recipes/llama_commonsense.py <flags>"""
import runpy
import sys

import torch

torch.backends.cuda.enable_cudnn_sdp(False)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
