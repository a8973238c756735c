"""How the scripts end: one line for a failure the user can fix, a traceback only for a bug.

Every script's entry point is `errors.run(main, FLAGS)`. A UserError (a bad file, folder or flag, a full
disk while saving: DataError, CheckpointError, NeighbourFileError, ... all derive from it) or an
absl UsageError ends the run with `<script>: error: <message>` on stderr and exit status 1; any
other exception is a bug and keeps its traceback. BINGO_TRACEBACK=1 shows the traceback of every
failure.
"""
import os
import sys

from absl import app, flags

TRACEBACK_ENV = 'BINGO_TRACEBACK'
INTERRUPTED_EXIT = 130  # the shell's status for a program stopped by SIGINT


class UserError(Exception):
    """A failure whose cause the message names and the user can fix; reported as one line."""
    label = 'error'
    exit_code = 1


def one_line(error):
    """The error's message on one line. An error raised in a DataLoader worker arrives with the
    worker's traceback in its text ('Caught DataError in DataLoader worker process 0. Original
    Traceback ...'): its last line holds the original message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and lines[0].startswith('Caught ') and 'Traceback' in lines[1]:
        last = lines[-1]
        name = type(error).__name__ + ': '
        return last.split(name, 1)[1] if name in last else last
    return ' '.join(lines)


def guarded(main, argv, prog):
    """main(argv), with the project's own failures reported as one line on stderr; returns the
    exit status."""
    show_traceback = os.environ.get(TRACEBACK_ENV, '') not in ('', '0')
    try:
        return main(argv)
    except (UserError, app.UsageError) as e:
        if show_traceback:
            raise
        label = getattr(e, 'label', 'error')
        print(f'{prog}: {label}: {one_line(e)}', file=sys.stderr, flush=True)
        return getattr(e, 'exit_code', 1)
    except KeyboardInterrupt:
        if show_traceback:
            raise
        print(f'{prog}: interrupted', file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT


def run(main, flag_values):
    """absl's app.run(main) over the script's own flags `flag_values` (utils/args.py), with
    `guarded`'s error reporting: the entry point of every script."""
    prog = os.path.basename(sys.argv[0])
    for name in flag_values:  # absl's parser and --help see them as the main module's flags
        flags.FLAGS[name] = flag_values[name]
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag_values[name])

    def parse(argv):
        remaining = app.parse_flags_with_usage(argv)
        flag_values.mark_as_parsed()  # parsed through the shared flag objects
        return remaining
    app.run(lambda argv: guarded(main, argv, prog), flags_parser=parse)
