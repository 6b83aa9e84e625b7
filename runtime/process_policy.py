"""ProcessPolicy: any policy run in a child process, so its Python work never holds the control process's GIL.

A policy's step is seconds of Python between engine calls (the decode program walks the grammar,
binds buffers, slices the LM head); in the robot's process it holds the GIL the 100 Hz control
thread needs, and every tick that wakes while the planner holds it waits up to the interpreter's
switch interval. In a child process it cannot. The wrapper has the Policy interface, so the
loop does not know the difference:

    parent (planner thread)                         child (spawned, its own interpreter)
    frame -> shared memory (allocated once) ---->   views of it -> the wrapped policy's step
    blocks on the pipe (GIL released)     <-----    the Plan (a few small arrays), or the error

Failure is loud and safe: an exception in the child comes back with its type and message (the
child's traceback as its cause); a child that dies or stops answering raises PolicyProcessError,
which ends the loop in the robot's safe state like any planner error. The child ignores Ctrl-C:
the terminal sends SIGINT to the whole process group, and it is the parent that decides when
the policy stops (after the robot is safe).

The plumbing under it (ChildProcess: a spawned child and its pipe with bounded waits and stop;
FrameSlab: an RGB-D frame in shared memory) also carries the simulator's bus and camera (sim_robot.py).
"""
from __future__ import annotations

import atexit
import dataclasses
import faulthandler
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable

import numpy as np

from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.policy import Observation, Plan, Policy, PolicyConfig, PolicyContext

log = logging.getLogger(__name__)

START_METHODS = ("spawn", "forkserver")    # never "fork": the parent has threads (camera, control) and locks
READY_TIMEOUT_S = 600.0     # loading: checksums (seconds per GB), sessions, TensorRT engine deserialization
STEP_TIMEOUT_S = 120.0      # a step this long means the child hangs (a 7B chunk on Orin takes seconds, not minutes)
CLOSE_TIMEOUT_S = 5.0       # the child's own close (release device memory) before it is terminated
# The policy process's niceness. On a busy 2-core machine (load 5) nice 10 cut the control tick's
# p99 from ~8 to ~5.5 ms (its joint read waits on the pty's kernel worker, a normal-priority thread
# the policy otherwise competes with) and the period error p99 from ~0.7 to ~0.2 ms, for a few %
# fewer plans; alone on a robot the policy still gets its whole core.
POLICY_NICE = 10
_ALIGN = 64                 # the depth image starts on a cache line, so its float32 view is aligned


class PolicyProcessError(EdgeactError):
    """The policy's process could not start, died, or stopped answering; the message names what happened."""


class ChildTraceback(Exception):
    """The traceback of an exception raised in the policy's process (set as the re-raised error's cause)."""


def policy_threads(cores: int | None = None) -> int:
    """Threads for a policy process that leave one core to the control process: cores - 1, at least 1."""
    if cores is None:       # the cores this process may run on (a container or taskset may allow fewer)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def with_thread_default(config: PolicyConfig) -> PolicyConfig:
    """`config` with its `threads` (onnxruntime's intra-op threads) set to cores - 1 when the user left it unset.

    Left unset, onnxruntime takes every core, and on a 2-core robot computer its spinning workers
    compete with the control thread and with each other (measured on a busy 2-core machine: 2
    threads made half the plans 1 thread did). A value the user wrote is kept as written; a config
    whose threads do not apply (`cpu_threads_apply`: a bundle on TensorRT) is kept as it is.
    """
    names = {f.name for f in dataclasses.fields(config)}
    if "threads" in names and getattr(config, "threads") is None and config.cpu_threads_apply:
        return dataclasses.replace(config, threads=policy_threads())
    return config


EXIT_REAP_POLLS = 100          # x 10 ms: how long a child that closed its pipes may take to become reapable


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}    # what a child ignores: its parent stops it (ChildProcess.stop)
EXIT_STOP_TIMEOUT_S = 1.0       # a child still running when the interpreter exits: asked this long, then killed


class ChildProcess:
    """A spawned child process and its pipe; the child's main takes the pipe first, then `args`.

    The plumbing of every process the robot starts (the policy; the simulator's bus and camera):
    bounded waits for answers that tell a dead child from a slow one, and a bounded stop (asked
    with ("stop",), then SIGKILL).
    """

    def __init__(self, target: Callable[..., None], args: tuple, name: str, start_method: str = "spawn"):
        if start_method not in START_METHODS:
            raise ConfigError(f"start method {start_method!r} unsupported for a child process; use one of "
                              f"{', '.join(START_METHODS)} (fork would copy the parent's threads and locks)")
        mp = multiprocessing.get_context(start_method)
        self.name = name
        self.conn, child_conn = mp.Pipe()
        self.process = mp.Process(target=target, args=(child_conn, *args), daemon=True, name=name)
        # The child inherits a blocked SIGINT and SIGTERM, so a Ctrl-C to the process group (or systemd stopping the
        # service: SIGTERM to the whole group) while it imports and unpickles its arguments (0.1-0.3 s, before its
        # main can ignore them) is held, not a traceback or a death; its main then ignores both and unblocks them
        # (ignore_interrupts). Ours are unblocked again at once. The first start launches multiprocessing's
        # resource tracker, which unblocks SIGINT after launching itself: launched here first, it cannot undo the
        # block.
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_conn.close()      # the child holds its end; with ours closed, the child's death reads as EOF here
        self._stop_lock = threading.Lock()
        # A child ignores SIGTERM, which is what multiprocessing stops daemon children with at exit (then waits for
        # them): an exit that skipped stop() (an error on the way out) would wait forever. Stopped here first
        # (atexit runs its hooks last registered first, multiprocessing's was registered at its import).
        atexit.register(self._stop_at_exit)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: tuple) -> bool:
        """False when the child is gone."""
        return send_quietly(self.conn, message)

    def receive(self, timeout_s: float) -> tuple | None:
        """The child's next message; None when it exited or sent nothing within timeout_s (`exit_status` says which)."""
        try:
            if not wait([self.conn, self.process.sentinel], timeout_s) or not self.conn.poll():
                return None
            return self.conn.recv()
        except (EOFError, OSError):     # the child is gone, or stop() closed the pipe under a waiting thread
            return None

    def exit_status(self) -> str:
        self.process.join(0.5)
        code = self.process.exitcode
        # A killed child closes its pipes a moment before the kernel lets it be reaped: while its sentinel says
        # it ended, give the exit code that moment (bounded) instead of calling it "still running".
        for _ in range(EXIT_REAP_POLLS):
            if code is not None or not wait([self.process.sentinel], 0):
                break
            time.sleep(0.01)
            code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:      # a real-time signal (SIGRTMIN + n) has no name
                name = str(-code)
            return f"killed by signal {name}"
        return f"exit code {code}"

    def stop(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Ask the child to stop; kill it if it does not (it ignores SIGTERM: ignore_interrupts). Safe from two
        threads."""
        with self._stop_lock:
            process = self.process
            if process.is_alive() and self.send(("stop",)):
                process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)
            atexit.unregister(self._stop_at_exit)
            if process.is_alive():
                log.error("%s (pid %s) survived SIGKILL; leaving it", self.name, process.pid)
            self.conn.close()

    def _stop_at_exit(self) -> None:
        self.stop(EXIT_STOP_TIMEOUT_S)


def send_quietly(conn, message: tuple) -> bool:
    """Send on a pipe whose other end may be gone: False then (nobody to tell)."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, OSError):
        return False
    return True


class FrameSlab:
    """One frame's RGB and depth images in shared memory: one process writes a frame, the other reads it."""

    def __init__(self, height: int, width: int, name: str | None = None):
        self.shape_hw = (height, width)
        self._depth_offset = -(-height * width * 3 // _ALIGN) * _ALIGN
        size = self._depth_offset + height * width * 4
        self.shm = SharedMemory(name=name, create=name is None, size=size if name is None else 0)
        self.rgb = np.ndarray((height, width, 3), np.uint8, self.shm.buf, 0)
        self.depth_m = np.ndarray((height, width), np.float32, self.shm.buf, self._depth_offset)

    @property
    def name(self) -> str:
        return self.shm.name

    def close(self, unlink: bool = False) -> None:
        self.rgb = self.depth_m = None      # the views pin the buffer: drop them before closing it
        try:
            self.shm.close()
        except BufferError:                 # a policy kept a view of its last frame; the process exit frees it
            log.debug("shared frame %s still viewed at close", self.shm.name)
        if unlink:
            self.shm.unlink()


class ProcessPolicy:
    """The policy `config` builds, run in a child process (start method "spawn" or "forkserver").

    Construction waits for the child to load the policy and re-raises its error (a missing bundle
    is the same ConfigError / BundleError as in-process). `step` has the wrapped policy's results, `steer`
    its steering (its refusals raised here); `close` stops the child (bounded: asked, then terminated, then killed).
    """

    def __init__(self, config: PolicyConfig, context: PolicyContext, *, start_method: str = "spawn",
                 step_timeout_s: float = STEP_TIMEOUT_S, ready_timeout_s: float = READY_TIMEOUT_S,
                 nice: int = POLICY_NICE):
        if not (step_timeout_s > 0 and ready_timeout_s > 0):
            raise ConfigError(f"step_timeout_s ({step_timeout_s}) and ready_timeout_s ({ready_timeout_s}) must be > 0")
        if not 0 <= nice <= 19:
            raise ConfigError(f"nice {nice}: must be in 0..19 (the policy may only give way, never take priority)")
        config = with_thread_default(config)
        self.config, self.step_timeout_s = config, step_timeout_s
        self.description = f"policy process ({config.type_name or type(config).__name__})"
        self._slab: FrameSlab | None = None
        self._broken: str | None = None     # why the child can no longer be used
        self._lock = threading.Lock()       # one exchange at a time on the pipe
        self._child = ChildProcess(_child_main, (config, context, nice),
                                   f"edgeact-policy-{config.type_name or 'custom'}", start_method)
        try:
            self._receive(ready_timeout_s, "loading the policy", loading=True)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def alive(self) -> bool:
        return self._child.alive

    def step(self, obs: Observation) -> Plan:
        with self._lock:
            if self._broken:
                raise PolicyProcessError(f"{self.description} is unusable: {self._broken}")
            slab_name = self._write_frame(obs)
            request = ("step", slab_name, self._slab.shape_hw, obs.depth_m is not None, obs.timestamp_s,
                       obs.proprio, obs.instruction, obs.frame_number, obs.depth_from_camera)
            if not self._child.send(request):
                self._fail(f"it exited before a step ({self._child.exit_status()})")
            return self._receive(self.step_timeout_s, "a step")

    def steer(self, trace) -> None:
        """The wrapped policy's steer(trace) in the child (a forced trace, or None); its refusal is raised here."""
        with self._lock:
            if self._broken:
                raise PolicyProcessError(f"{self.description} is unusable: {self._broken}")
            if not self._child.send(("steer", trace)):
                self._fail(f"it exited before steering ({self._child.exit_status()})")
            self._receive(self.step_timeout_s, "steering")

    def _write_frame(self, obs: Observation) -> str:
        height, width = obs.rgb.shape[:2]
        if self._slab is None or self._slab.shape_hw != (height, width):
            if self._slab is not None:      # the camera changed size: a new slab, the child attaches to it
                self._slab.close(unlink=True)
            self._slab = FrameSlab(height, width)
        np.copyto(self._slab.rgb, obs.rgb)
        if obs.depth_m is not None:
            np.copyto(self._slab.depth_m, obs.depth_m, casting="same_kind")
        return self._slab.name

    def _receive(self, timeout_s: float, doing: str, loading: bool = False) -> Any:
        """The child's answer to the last request: its result, or its error re-raised here."""
        message = self._child.receive(timeout_s)
        if message is None:
            status = self._child.exit_status()
            self._fail(f"it exited during {doing} ({status})" if status != "still running"
                       else f"it did not answer within {timeout_s:g} s during {doing}; it was stopped", loading)
        kind, *payload = message
        if kind == "error":
            error, child_traceback = payload
            raise error from ChildTraceback(child_traceback)
        return payload[0]

    def _fail(self, why: str, loading: bool = False) -> None:
        self._broken = why
        self._child.stop(timeout_s=1.0)     # dead or hung: asking it nicely for long is pointless
        then = ("the robot was not started" if loading else
                "the loop stops and the robot goes to its safe state")
        raise PolicyProcessError(f"{self.description} failed: {why}; {then}. Look above for the child's own error "
                                 "output (a crash in native code prints its Python stack there); to debug, run the "
                                 "policy in-process with `process: false` in the policy section")

    def close(self) -> None:
        """Stop the child and free the shared frame; safe to call twice and while a step waits (it then fails)."""
        self._broken = self._broken or "closed"
        self._child.stop()
        if self._slab is not None:
            self._slab.close(unlink=True)
            self._slab = None


# -- the child -----------------------------------------------------------------------------------

def _child_main(conn, config: PolicyConfig, context: PolicyContext, nice: int) -> None:
    """The policy process: load, then answer step requests until "stop" or the parent's end of the pipe closes."""
    ignore_interrupts()     # Ctrl-C is the parent's to handle: it stops us after the robot
    faulthandler.enable()   # a crash in native code (onnxruntime, a driver) prints the Python stack it came from
    if nice:
        os.nice(nice)       # lowering one's own priority is always permitted
    try:
        policy: Policy = config.make_policy(context)
    except BaseException as exc:    # the process boundary: everything goes back to the parent, which raises it
        # sys.exit or a KeyboardInterrupt raised by the loading code is its failure, not the parent's exit or Ctrl-C.
        error = (portable_error(exc) if isinstance(exc, Exception) else
                 PolicyProcessError(f"loading the policy raised {type(exc).__name__}"
                                    + (f" ({exc})" if str(exc) else "") + "; the robot was not started"))
        send_quietly(conn, ("error", error, traceback.format_exc()))
        return
    slab: FrameSlab | None = None

    def answer(request: tuple) -> tuple:
        nonlocal slab
        if request[0] == "steer":
            return steer(request[1])
        _, slab_name, shape_hw, has_depth, timestamp_s, proprio, instruction, frame_number, depth_from_camera = request
        if slab is None or slab.name != slab_name:
            if slab is not None:
                slab.close()
            slab = FrameSlab(*shape_hw, name=slab_name)
        try:
            obs = Observation(rgb=_read_only(slab.rgb), depth_m=_read_only(slab.depth_m) if has_depth else None,
                              timestamp_s=timestamp_s, proprio=proprio, instruction=instruction,
                              frame_number=frame_number, depth_from_camera=depth_from_camera)
            return ("plan", policy.step(obs))
        except Exception as exc:        # the step's error is the parent's to raise
            return ("error", portable_error(exc), traceback.format_exc())

    def steer(trace) -> tuple:
        try:
            if not callable(getattr(policy, "steer", None)):
                raise ConfigError(f"policy type {config.type_name!r} ({type(policy).__name__}) cannot be steered: it "
                                  "has no steer(trace); steer a bundle policy")
            policy.steer(trace)
            return ("steered", None)
        except Exception as exc:        # a refused trace is the parent's to raise
            return ("error", portable_error(exc), traceback.format_exc())

    try:
        if send_quietly(conn, ("ready", os.getpid())):
            serve_until_stop(conn, answer)
    finally:
        policy.close()
        if slab is not None:
            slab.close()


def ignore_interrupts() -> None:
    """A child process's first step: ignore SIGINT and SIGTERM (a terminal's Ctrl-C goes to the whole process group,
    and so does systemd's SIGTERM when it stops a service; the parent stops its children after the robot is safe:
    a simulator killed first would take the motors with it), then unblock them (ChildProcess starts children with
    them blocked)."""
    for interrupt in INTERRUPTS:
        signal.signal(interrupt, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


def serve_until_stop(conn, answer: Callable[[tuple], tuple | None]) -> None:
    """A child process's request loop: every message but ("stop",) goes to `answer`, whose reply (unless None)
    is sent back. Ends on ("stop",), when the parent is gone (end of file), or when a reply cannot be sent."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):     # the parent is gone
            return
        if message[0] == "stop":
            return
        reply = answer(message)
        if reply is not None and not send_quietly(conn, reply):
            return


def _read_only(view: np.ndarray) -> np.ndarray:
    """The frame is the parent's: valid for this step only, and not the policy's to write."""
    out = view.view()
    out.flags.writeable = False
    return out


def portable_error(exc: BaseException) -> BaseException:
    """`exc` itself when it survives pickling (type and message intact), else a PolicyProcessError naming it."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:               # an exception whose __init__ does not take its args back: name it instead
        log.debug("exception %s does not pickle", type(exc).__name__)
    return PolicyProcessError(f"{type(exc).__name__}: {exc}")
