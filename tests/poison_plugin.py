"""A Pillow plugin whose "photos" really crash or hang the process that decodes them, for the poison tests.

A file starting with ``POISON:<ACTION>`` is claimed by this plugin when the decoder opens it:
- SEGV: reads address 0 in native code (SIGSEGV)
- ABORT: calls libc abort() (SIGABRT)
- HANG: locks a non-recursive pthread mutex twice, a hang inside native code that no signal handler breaks
- KILL: SIGKILL to itself, as the kernel's OOM killer would
- MEMORY: allocates 64 GiB, more than any decoder may have
- SLEEP: sleeps in Python for a minute (a slow decoder)

Loaded into the decoder's process with ``photos.plugins: [<this file>]``; never imported by the package.
"""

import ctypes
import os
import signal
import time

from PIL import Image, ImageFile

MAGIC = b"POISON:"


def _act(action: bytes) -> None:
    libc = ctypes.CDLL(None)
    if action == b"SEGV":
        ctypes.string_at(0)
    elif action == b"ABORT":
        libc.abort()
    elif action == b"HANG":
        mutex = ctypes.create_string_buffer(64)  # larger than any pthread_mutex_t
        libc.pthread_mutex_init(mutex, None)
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)
    elif action == b"KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == b"MEMORY":
        bytearray(64 << 30)
    elif action == b"SLEEP":
        time.sleep(60)


class PoisonImageFile(ImageFile.ImageFile):
    format = "POISON"
    format_description = "a file that crashes or hangs its decoder (tests only)"

    def _open(self) -> None:
        header = self.fp.read(32)
        _act(header[len(MAGIC):].split(b"\n")[0].strip())
        raise SyntaxError("poison file survived")


Image.register_open(PoisonImageFile.format, PoisonImageFile, lambda prefix: prefix.startswith(MAGIC))
Image.register_extension(PoisonImageFile.format, ".poison")
