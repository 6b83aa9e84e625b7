"""Error types shared by every package; each message names the problem and the fix."""


class EdgeactError(Exception):
    """Base of errors a user can act on (shown without a traceback by the CLI)."""


class CheckpointError(EdgeactError):
    """A checkpoint directory is missing a file, has a bad key, shape or config."""


class ConfigError(EdgeactError):
    """A config file or config field is invalid."""


class BundleError(EdgeactError):
    """A bundle is corrupt, partial, of the wrong schema, or failed verification."""


class SequenceTooLongError(BundleError):
    """Prompt plus answer would overflow the KV cache the bundle was exported for (its max_seq)."""


class GrammarError(EdgeactError):
    """Text or token ids do not follow the answer grammar."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, systemd stopping a service) raised as an interrupt: it stops the robot as Ctrl-C does,
    and the run says which it was."""


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143     # 128 + SIGINT, 128 + SIGTERM: a command's status, as a shell says


def interrupt_status(sigterm: bool) -> int:
    """The exit status of a command an interrupt ended: SIGTERM's or Ctrl-C's."""
    return EXIT_TERMINATED if sigterm else EXIT_INTERRUPTED


class OutputLostError(EdgeactError):
    """A run's output (a recording, a summary) could not be finished: the robot is as the run left it, the file may
    lack its end."""
