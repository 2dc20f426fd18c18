"""An operator task type: `user_specific`, the one the reference design's API tests submit.

Load it with `[queue] tasks_dir = "<path to this folder>"`. It records which
user a piece of work belongs to and returns it with the caller's number; the
input schema is what /tasks/submit validates (and what /openapi.json shows).
"""

from typing import Annotated

import msgspec

from appliance.tasks.registry import task_type


class UserSpecificInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1, description="the user the work is for")]
    task_num: Annotated[int, msgspec.Meta(ge=0, le=1_000_000, description="the caller's number for this piece of work")] = 0


@task_type("user_specific", schema=UserSpecificInput, description="work done for one user (an example operator task)")
def user_specific(ctx, data: UserSpecificInput):
    ctx.progress(100, f"work {data.task_num} for user {data.user_id} done")
    return {"user_id": data.user_id, "task_num": data.task_num}
