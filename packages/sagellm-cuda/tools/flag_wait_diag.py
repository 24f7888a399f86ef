"""Does a stream wait on a host word (cuStreamWaitValue32) hang because of lazy module loading?

    python packages/sagellm-cuda/tools/flag_wait_diag.py VARIANT     (run each under a timeout)

Variants: lazy (a kernel new to the process launched behind the wait, the same thread writing
the word afterwards: expected to hang), eager (CUDA_MODULE_LOADING=EAGER set by caller),
warm (the kernel after the wait launched once before), thread-torch / thread-triton (a new
kernel after the wait, the word written by another Python thread 100 ms later: the launching
thread must not hold the GIL while its load waits)."""
import ctypes
import os
import sys
import threading
import time

import torch
import triton
import triton.language as tl

variant = sys.argv[1]
lib = ctypes.CDLL("libcuda.so.1")
fn = lib.cuStreamWaitValue32_v2
fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
fn.restype = ctypes.c_int


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1, mask=m)


torch.zeros(1, device="cuda")
torch.cuda.synchronize()
stream = torch.cuda.current_stream()
flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
word = flag.numpy().view("uint32")
x = torch.randn(4096, device="cuda")
if variant == "warm":
    x.sum()
    torch.cuda.synchronize()
if variant == "thread-triton":
    _add_one.warmup(x, 4096, BLOCK=1024, grid=(4,))  # compiled, not yet loaded
writer = None
if variant.startswith("thread"):
    def write():
        time.sleep(0.1)
        word[0] = 1
    writer = threading.Thread(target=write)
t0 = time.monotonic()
rc = fn(stream.cuda_stream, flag.data_ptr(), 1, 0)
print(variant, "wait rc", rc, flush=True)
if writer:
    writer.start()
if variant == "thread-triton":
    _add_one[(4,)](x, 4096, BLOCK=1024)
else:
    out = x.sum()
done = torch.cuda.Event()
done.record(stream)
print(variant, f"launched after {(time.monotonic() - t0) * 1e3:.1f} ms; done before write:",
      done.query(), flush=True)
if not writer:
    time.sleep(0.05)
    word[0] = 1
t = time.monotonic()
while not done.query() and time.monotonic() - t < 5:
    time.sleep(0.001)
print(variant, "RESULT done:", done.query(),
      f"{(time.monotonic() - t0) * 1e3:.1f} ms from the wait", flush=True)
os._exit(0)
