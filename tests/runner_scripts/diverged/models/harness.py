"""The trusted harness's early stop on a NaN loss: status diverged, exit 3."""

import sys

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    print("step 0 loss nan")
    fakekit.write_results("diverged", {}, error="loss became NaN at step 0")
    sys.exit(3)
