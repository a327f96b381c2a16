"""A C program that drives the policy of a ``build-c`` library line by line, for the parity tests.

It reads ``OP A B`` lines and prints one line each:

* ``s DEADLINE ENERGY``: ``edgetts_policy_select``, printed as ``INDEX MISS``;
* ``o INDEX LATENCY``: ``edgetts_policy_observe``, printed as the slowdown after it;
* ``p PRICE 0``: ``edgetts_set_price``, printed as the price in force after it;
* ``b BUDGET COST``: ``edgetts_set_mean_budget`` (COST 0: ms, 1: J), printed as its status;
* ``c COST 0``: ``edgetts_spent``, printed as the price that follows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CC = shutil.which("cc") or shutil.which("gcc")

SOURCE = r"""
#include <stdio.h>
#include "edgetts.h"
int main(void) {
    edgetts_runtime *rt = NULL;
    char err[512], op;
    double a, b;
    if (edgetts_open(NULL, &rt, err, sizeof err) != EDGETTS_OK) { fprintf(stderr, "%s\n", err); return 1; }
    while (scanf(" %c %lf %lf", &op, &a, &b) == 3) {
        int miss;
        if (op == 's') { int i = edgetts_policy_select(rt, a, b, &miss); printf("%d %d\n", i, miss); }
        else if (op == 'o') { edgetts_policy_observe(rt, (int)a, b); printf("%.17g\n", edgetts_policy_slowdown(rt)); }
        else if (op == 'p') { edgetts_set_price(rt, a); printf("%.17g\n", edgetts_price(rt)); }
        else if (op == 'b') { printf("%d\n", edgetts_set_mean_budget(rt, a, (edgetts_cost)(int)b)); }
        else { printf("%.17g\n", edgetts_spent(rt, a)); }
    }
    edgetts_close(rt);
    return 0;
}
"""


def build_driver(built: Path, exe: Path) -> Path:
    """Compile the driver at ``exe`` against the library ``build-c`` wrote into ``built``, strictly."""
    subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{built / 'include'}", "-o",
                    str(exe), "-x", "c", "-", f"-L{built / 'lib'}", "-ledgetts", f"-Wl,-rpath,{built / 'lib'}"],
                   input=SOURCE, text=True, check=True)  # fmt: skip
    return exe


def drive(exe: Path, lines: list[str]) -> list[str]:
    """The driver's output line for each of ``lines``."""
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[: len(lines)]
