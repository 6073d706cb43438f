"""Running a benchmark's child process and measuring it, for the bench scripts."""
import re
import subprocess
import sys


def run_measured(cmd, env=None):
    """Runs cmd in a child process (through a small Python parent that reads the child's resource
    usage): returns (stdout, stderr, peak RSS in MB, wall time in s). Exits naming the command if
    it fails."""
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "w = time.perf_counter() - t\n"
            "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'WALL', w,"
            " file=sys.stderr)\n"
            "sys.exit(p.returncode)")
    p = subprocess.run([sys.executable, "-c", code, *map(str, cmd)], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{[str(c) for c in cmd[:3]]} failed: {p.stderr[-2000:]}")
    m = re.search(r"PEAK_RSS_KB (\d+) WALL ([0-9.]+)", p.stderr)
    return p.stdout, p.stderr, int(m.group(1)) / 1024, float(m.group(2))
