"""What this machine's kernel charges for the two things tsusage cannot do less of.

    python3 benches/compare/machine.py [DIR]        (DIR: a directory on the disk measured; default /tmp)

- a rename of a file into a subdirectory, through directory descriptors (as `ingest` moves each
  callback file into `processed/`), over 20,000 empty files;
- an fdatasync after an overwrite of 16 KiB (as a journal commit: the listener pays one per group).

Both vary between VMs of the same kind by up to 3x (a rename took 8 us on one and 19-25 us on
another), more than any change to tsusage moves them: `run.sh` and docs/performance.md quote these
lines next to the figures they explain.
"""

import os
import shutil
import sys
import tempfile
import time


def renames(base, n=20_000):
    d = tempfile.mkdtemp(prefix="tsusage-machine-", dir=base)
    try:
        os.mkdir(os.path.join(d, "processed"))
        names = [f"callback-{i:06}.json" for i in range(n)]
        for name in names:
            open(os.path.join(d, name), "w").close()
        src = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        dst = os.open(os.path.join(d, "processed"), os.O_RDONLY | os.O_DIRECTORY)
        wall, cpu = time.perf_counter(), time.process_time()
        for name in names:
            os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        os.close(src)
        os.close(dst)
        return wall / n * 1e6, cpu / n * 1e6
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fdatasyncs(base, n=300, size=16 * 1024):
    fd, path = tempfile.mkstemp(prefix="tsusage-machine-", dir=base)
    try:
        os.write(fd, b"\0" * (4 << 20))
        os.fsync(fd)
        block = os.urandom(size)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            os.pwrite(fd, block, (i * size) % (4 << 20))
            os.fdatasync(fd)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return wall / n * 1e6, cpu / n * 1e6
    finally:
        os.close(fd)
        os.unlink(path)


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    wall, cpu = renames(base)
    print(f"this machine: a rename into a subdirectory {wall:.1f} us ({cpu:.1f} us CPU) a file, over 20,000")
    wall, cpu = fdatasyncs(base)
    print(f"this machine: an fdatasync after a 16 KiB overwrite {wall:.0f} us ({cpu:.0f} us CPU), over 300")


if __name__ == "__main__":
    main()
