"""Training tasks (signals, trajectories3d, text) and applied pipelines (finance/).

Only the task contract is imported here; each task module, and finance, loads on demand.
"""

from moekit.tasks.base import TASKS, Batch, Task, TaskConfig, build_task

__all__ = ["TASKS", "Batch", "Task", "TaskConfig", "build_task"]
