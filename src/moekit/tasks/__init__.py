"""Training tasks (signals, trajectories3d, text), found by name, and applied pipelines (finance/).

Add a task with `@register_task("name", options=MyOptions)` on a `Task` subclass; it is then
usable as `--task.name name` with its options under `--task.options.*`. The built-in tasks
register on import; their data is made or read only when a task is built.
"""

from moekit.model.task import (
    Batch,
    NoOptions,
    Task,
    TaskConfig,
    available_tasks,
    build_task,
    register_task,
    task_class,
)

__all__ = [
    "Batch",
    "NoOptions",
    "Task",
    "TaskConfig",
    "available_tasks",
    "build_task",
    "register_task",
    "task_class",
]

from moekit.tasks import signals, text, trajectories3d  # noqa: E402,F401  (registration)
