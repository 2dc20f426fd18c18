"""The task domain, shared by the API and the task roles (appliance.queue).

- appliance.tasks.service: submit, batch, chain, status, cancel, logs, stats, list.
- appliance.tasks.lifecycle: every write to a task's status, the one retry-or-fail step,
  what a finished task triggers (callbacks, its group's next step).
- appliance.tasks.records: new task rows, the batched history and log rows.
- appliance.tasks.broker: the Huey factory (`get_queue`, `enqueue`, `depth`); it carries
  only `(task_id, attempt)` messages, the task row is the source of truth.
- appliance.tasks.registry: task types and their input schemas (`task_type`, used by
  operators' [queue] tasks_dir files), with the built-in types (builtins) and the data
  processors (dataprocs, on limits, jsonstream and patterns).
- appliance.tasks.schedules: cron schedules; groups: batches and chains;
  callbacks: signed completion/error/progress POSTs; quotas: per-user limits;
  stats: /tasks/stats; context: the TaskContext task code receives.

Nothing here imports a role package.
"""
