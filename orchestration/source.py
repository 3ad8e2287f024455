"""The preference source as an observable asset at the head of the graph: its data version is the
fingerprint of the data download reads (demo settings, the bytes of local files, a Hub dataset's
commit sha), so the UI marks raw_preferences stale when the source changed and not when a file was
only touched. The source_data_changed sensor reports the same observation when it starts a run.
"""
import hashlib
import json
import warnings
from typing import Optional

import dagster as dg

from rm_lib import network
from rm_lib.errors import DataError

from .resources import HubResource, ProjectResource

GROUP = "reward_model_pipeline"


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def source_fingerprint(project: ProjectResource, hub: HubResource,
                       previous: Optional[dict] = None) -> tuple[Optional[dict], str]:
    """(state or None, what was looked at) for params.yaml's download.source. The state's
    `fingerprint` changes only when the data does: demo -> its settings; a local file or folder -> the
    content hash of the files the download step reads (rm_lib.data.sources.local_fingerprint: a
    `touch` is no change); a Hub dataset -> the commit sha the Hub serves. What was looked at names a
    URL without its credentials: sensor ticks and the Observe button's failure stay in the UI."""
    state, what = _fingerprint(project, hub, previous)
    return state, network.without_credentials(what)


def _fingerprint(project: ProjectResource, hub: HubResource, previous: Optional[dict]) -> tuple[Optional[dict], str]:
    from rm_lib.data.sources import local_fingerprint, source_kind

    cfg = project.load_params().download
    try:
        kind = source_kind(cfg.source)
    except DataError as exc:
        return None, f"source not readable now: {exc}"
    if kind == "demo":
        return {"fingerprint": _sha256({"demo": cfg.demo_pairs, "seed": cfg.seed})}, \
            f"demo set of {cfg.demo_pairs} pairs"
    if kind == "local":
        try:
            local = local_fingerprint(cfg.source, (previous or {}).get("local"))
        except (DataError, OSError) as exc:
            return None, f"source not readable now: {exc}"
        size = sum(s[1] for s in local["stats"])
        return {"fingerprint": _sha256({"local": local["sha256"]}), "local": local}, \
            f"{len(local['stats'])} file(s), {size} bytes in {cfg.source}"
    sha = hub.dataset_fingerprint(cfg.source, cfg.revision)
    if sha is None:
        return None, f"the Hub did not answer for dataset {cfg.source} (offline, private or missing)"
    fingerprint = _sha256({"hub": cfg.source, "subset": cfg.subset, "sha": sha})
    return {"fingerprint": fingerprint}, f"hf://{cfg.source} at {sha}"


def observation(state: dict, what: str) -> dg.AssetObservation:
    """The source's observation as a sensor reports it: the same data version the asset's own
    observation gives."""
    return dg.AssetObservation(asset_key=preference_source.key, description=what,
                               metadata={"looked_at": what},
                               tags={"dagster/data_version": state["fingerprint"]})


def _observe(project: ProjectResource, hub: HubResource) -> dg.ObserveResult:
    state, what = source_fingerprint(project, hub)
    if state is None:
        raise dg.Failure(description=what, allow_retries=False)
    return dg.ObserveResult(data_version=dg.DataVersion(state["fingerprint"]), metadata={"looked_at": what})


# observable_source_asset is marked beta in 1.13; its warning would greet every `dagster dev`.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    preference_source = dg.observable_source_asset(
        name="preference_source",
        group_name=GROUP,
        description="download.source of params.yaml (the demo set, a local file or folder, a Hub dataset). "
                    "Observed: its data version is the fingerprint of the data (file bytes, the Hub commit sha), "
                    "so a touch changes nothing and new data marks raw_preferences stale.")(_observe)
