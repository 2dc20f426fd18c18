"""Where operators' task files of earlier releases import `task_type` from; the registry is appliance.tasks.registry.

Kept so that a [queue] tasks_dir written as `from appliance.queue.registry import task_type`
loads unchanged; new files import from appliance.tasks.registry. Nothing in the appliance
imports this module.
"""

from appliance.tasks.registry import TaskType, task_type

__all__ = ["TaskType", "task_type"]
