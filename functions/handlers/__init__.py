"""The four CloudEvent handlers, each `async (CloudEvent, Context) -> dict`, by functions-framework target."""

from functions.handlers.job_finished import handle as handle_job_finished
from functions.handlers.snapshot_due import handle as handle_snapshot_due
from functions.handlers.task_command import handle as handle_task_command
from functions.handlers.task_submitted import handle as handle_task_submitted

HANDLERS = {
    "task_submitted": handle_task_submitted,
    "job_finished": handle_job_finished,
    "snapshot_due": handle_snapshot_due,
    "task_command": handle_task_command,
}
