"""Reads stdin, then prints a 10 MB line without a newline, then a normal line."""

import sys

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    stdin = sys.stdin.read()
    sys.stdout.write("y" * (10 * 2**20))
    sys.stdout.flush()
    sys.stderr.write("\nafter the long line\n")
    fakekit.write_results("ok", {"final_r2": 0.5, "stdin_bytes": len(stdin)})
