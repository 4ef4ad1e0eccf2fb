"""The errors a user can fix, shared by the library and the command line.

Every one of them carries a one-line message that names the problem and what to change; the
`research` command only formats them (`research: error: <message>`, exit status 2; a
checkpoint that cannot be written or read: exit status 1). Calling the library from Python
raises the same typed errors, so a notebook or a script can catch `ResearchError`.

  ResearchError      base class
    ConfigError      research.config: an unknown key, a value out of range, a bad combination
    ExperimentError  research.experiments: an experiment, group or argument that does not exist
    MeshError        research.sharding: a mesh that does not fit the devices
    DataError        research.data: a corpus that is missing, corrupt or too small
    RunError         research.train: a work directory that holds another run, or is in use
    CheckpointError  research.checkpoint: a checkpoint that cannot be written or read
    ReportError      research.report: runs or results that cannot be tabulated
    InputError       research.infer: inputs a model cannot take (token ids out of range)
"""

from __future__ import annotations


class ResearchError(Exception):
  """A problem the user can fix; the message is one line saying what it is."""


class ConfigError(ResearchError, ValueError):
  """A configuration problem: unknown key, bad value, or an inconsistent combination."""


class RunError(ResearchError, RuntimeError):
  """A run cannot start or continue as asked (its work directory holds another run, or is in
  use by another process)."""


class WorkdirBusy(RunError):
  """Another live process holds the work directory's lock."""


class InputError(ResearchError, ValueError):
  """Inputs a model cannot take (e.g. token ids outside the vocabulary)."""
