"""The task roles: the worker that consumes the queue and the scheduler that fires cron schedules.

- appliance.queue.worker: the worker role (`serve(cfg, index)`): Huey's consumer, the
  watcher thread (forced cancels, the reaper).
- appliance.queue.runner: one attempt of a task inside a worker (`Runner`, `Runtime`).
- appliance.queue.reaper: recovery of tasks whose worker died and of lost messages.
- appliance.queue.scheduler: the scheduler's loop with the upload retention sweep
  (appliance.queue.retention): a thread of the monitor's process (`hosted`) by default,
  or the scheduler role (`serve(cfg, index)`) with [monitor] enabled = false.

The task domain they run (submit, records, the status lifecycle, schedules, task types,
the Huey factory) lives in appliance.tasks, which the API uses without importing a role.
"""
