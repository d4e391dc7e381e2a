"""`studylib <command> ...`: one entry point; each command lives in its own module.

Commands are imported lazily so `studylib corpus` does not pay for torch start-up it does not need.
Ctrl-C and SIGTERM stop every command the same way: one line, exit code 130 (SIGINT) or 143 (SIGTERM);
`train` and `study` first mark their runs interrupted and say how to resume (their own line instead).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv list and returning an exit code)
COMMANDS = {
    "corpus": ("studylib.study.corpus", "cli"),
    "train": ("studylib.training.train", "cli"),
    "latents": ("studylib.training.latents", "cli"),
    "evaluate": ("studylib.training.evaluate", "cli"),
    "opus": ("studylib.training.evaluate", "opus_cli"),
    "audit": ("studylib.analysis.audit", "cli"),
    "study": ("studylib.study.runner", "cli"),
    "findings": ("studylib.analysis.findings", "cli"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: studylib {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"studylib: unknown command {name!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name]
    from studylib.core import processes
    from studylib.core.config import UserError

    processes.raise_on_sigterm()
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except UserError as e:  # a command that let a user's mistake through still answers in one line
        print(f"studylib {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what was written is whole (atomic writes), locks released
        signal, code = processes.stop_signal(e)
        print(f"studylib {name}: stopped by {signal}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
