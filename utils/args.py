"""A script's flags as one frozen object, read once in main() and passed down (torchvision's `args`).

Each script defines its flags on a FlagValues of its own (`FLAGS = flags.FlagValues()`, every
DEFINE with `flag_values=FLAGS`), so that several scripts' flags live in one process (the tests
build and run them in process); `errors.run(main, FLAGS)` parses the command line into it.
`main` reads them once, `Args.from_flags(FLAGS)`, and hands the result to the script's `run(args)`;
no other code reads FLAGS.
"""
import types


class Args(types.SimpleNamespace):
    """Flag values as attributes (`args.lr`), read-only: a value a script resolves (a default that
    depends on another flag) makes a new Args with `replace`."""

    @classmethod
    def from_flags(cls, flag_values):
        """Every flag of `flag_values` with its parsed value."""
        return cls(**flag_values.flag_values_dict())

    def __setattr__(self, name, value):
        raise AttributeError(f'args.{name} is read-only: use args.replace({name}=...)')

    def __delattr__(self, name):
        raise AttributeError(f'args.{name} is read-only')

    def replace(self, **changes):
        """A copy with `changes` applied; each must name an existing flag."""
        unknown = sorted(set(changes) - set(vars(self)))
        if unknown:
            raise AttributeError(f'no such flag: {", ".join(unknown)}')
        return type(self)(**{**vars(self), **changes})
