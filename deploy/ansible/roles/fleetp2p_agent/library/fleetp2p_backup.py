#!/usr/bin/python
"""Ansible module: back up files once before the role changes them, restore them on rollback.

The backup tree under ``backup_dir/files`` mirrors each file's absolute path.
A stamp beside the copy records what was there before fleetp2p:
``<path>.fleetp2p-present`` (the copy is the original) or
``<path>.fleetp2p-absent`` (there was no file). A path that already has a
stamp is never backed up again, so a second rollout cannot overwrite the
original with the role's own file.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: fleetp2p_backup
short_description: Back up files once before they are changed; restore them later
description:
  - C(state=saved) records, for every path without a record yet, a copy of the file
    or the fact that it did not exist.
  - C(state=restored) puts back every recorded file, removes the files that did not
    exist, then deletes the backup directory.
options:
  paths:
    description: Absolute paths to record (C(state=saved) only).
    type: list
    elements: path
    default: []
  backup_dir:
    description: Where the records live.
    type: path
    required: true
  state:
    description: C(saved) or C(restored).
    type: str
    choices: [saved, restored]
    default: saved
  prune_below:
    description:
      - With C(state=restored), directories left empty by removing a file are removed
        too, up to but not including this directory.
    type: path
author: fleetp2p
"""

EXAMPLES = r"""
- name: Back up containerd's files
  fleetp2p_backup:
    paths: [/etc/containerd/config.toml, /etc/containerd/certs.d/docker.io/hosts.toml]
    backup_dir: /var/backups/fleetp2p

- name: Restore them
  fleetp2p_backup:
    backup_dir: /var/backups/fleetp2p
    state: restored
    prune_below: /etc/containerd/certs.d
"""

RETURN = r"""
saved:
  description: Paths recorded by this run.
  returned: state=saved
  type: list
restored:
  description: Paths whose content was put back or that were removed.
  returned: state=restored
  type: list
"""

import filecmp
import os
import shutil

from ansible.module_utils.basic import AnsibleModule

PRESENT = ".fleetp2p-present"
ABSENT = ".fleetp2p-absent"


def _record_root(backup_dir: str) -> str:
    return os.path.join(backup_dir, "files")


def _copy_path(backup_dir: str, path: str) -> str:
    return _record_root(backup_dir) + os.path.abspath(path)


def _recorded(backup_dir: str, path: str) -> bool:
    copy = _copy_path(backup_dir, path)
    return os.path.exists(copy + PRESENT) or os.path.exists(copy + ABSENT)


def save(paths: list[str], backup_dir: str, check_mode: bool) -> list[str]:
    """Record each path that has no record yet; returns the paths recorded now."""
    saved = []
    for path in paths:
        if _recorded(backup_dir, path):
            continue
        saved.append(path)
        if check_mode:
            continue
        copy = _copy_path(backup_dir, path)
        os.makedirs(os.path.dirname(copy), mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            shutil.copy2(path, copy)
            stamp = copy + PRESENT
        else:
            stamp = copy + ABSENT
        with open(stamp, "w", encoding="utf-8"):
            pass
    return saved


def _stamps(backup_dir: str) -> list[tuple[str, bool]]:
    """(original path, existed) for every record."""
    root = _record_root(backup_dir)
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            for suffix, existed in ((PRESENT, True), (ABSENT, False)):
                if name.endswith(suffix):
                    stamp_path = os.path.join(directory, name[: -len(suffix)])
                    found.append((stamp_path[len(root):], existed))
    return sorted(found)


def _prune(path: str, stop: str | None) -> None:
    """Remove the now-empty directories above `path`, below `stop`."""
    if not stop:
        return
    stop = os.path.abspath(stop)
    directory = os.path.dirname(os.path.abspath(path))
    while directory.startswith(stop + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def restore(backup_dir: str, prune_below: str | None, check_mode: bool) -> list[str]:
    """Put every recorded file back (or remove it); returns the paths that changed."""
    restored = []
    for path, existed in _stamps(backup_dir):
        copy = _copy_path(backup_dir, path)
        if existed:
            if os.path.exists(path) and filecmp.cmp(copy, path, shallow=False):
                continue
            restored.append(path)
            if not check_mode:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copy2(copy, path)
        elif os.path.lexists(path):
            restored.append(path)
            if not check_mode:
                os.remove(path)
                _prune(path, prune_below)
    if not check_mode and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    return restored


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "paths": {"type": "list", "elements": "path", "default": []},
            "backup_dir": {"type": "path", "required": True},
            "state": {"type": "str", "choices": ["saved", "restored"], "default": "saved"},
            "prune_below": {"type": "path"},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        if params["state"] == "saved":
            saved = save(params["paths"], params["backup_dir"], module.check_mode)
            module.exit_json(changed=bool(saved), saved=saved)
        had_backups = os.path.isdir(params["backup_dir"])
        restored = restore(params["backup_dir"], params["prune_below"], module.check_mode)
        module.exit_json(changed=bool(restored) or had_backups, restored=restored)
    except OSError as e:
        module.fail_json(msg=f"{e.filename or params['backup_dir']}: {e.strerror}")


if __name__ == "__main__":
    main()
