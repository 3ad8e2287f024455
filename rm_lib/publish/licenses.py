"""The license ids the Hub's model cards take, and a word where a stated one is not among them.

The Hub refuses a card whose `license` it does not know, at upload (after the gate and the release were
built); a license outside its list is stated as `other`, named by `license_name`, linked by `license_link`.
The list grows on the Hub's side, so an id not in this copy is a warning, never a refusal.
"""
from __future__ import annotations

import difflib

# The Hub's documented ids (docs/hub/repositories-licenses), as of 2026.
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 agpl-3.0 gfdl gpl
gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql
ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3 gemma
unknown other
""".split())


def unlisted_license_note(license: str | None) -> str | None:
    """A warning for a stated license the Hub did not list (a typo, or an id newer than this list); None
    where it is listed or none is stated."""
    if license is None or license in HUB_LICENSES:
        return None
    near = difflib.get_close_matches(license, sorted(HUB_LICENSES), n=3, cutoff=0.6)
    guess = f" (did you mean {' or '.join(near)}?)" if near else ""
    return (f"push.license '{license}' is not among the Hub's license ids that rm_lib knows{guess}: the Hub "
            "refuses a model card whose license it does not list, at upload. A license outside its list is "
            "stated as push.license=other with push.license_name and push.license_link")
