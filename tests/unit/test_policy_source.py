"""The directory policy source on real files: inotify, debounce, rescans, a ConfigMap's swap.

Every test drives `DirectorySource` on a temporary directory with the operations operators and
the kubelet really perform (write, edit in place, rename over, delete, `mkdir -p` of a missing
path, the `..data` symlink swap of a mounted ConfigMap, replacing the whole directory) and checks
that `changed()` returns within the 1 s budget and that `read()` then holds the new documents.
Nothing here is mocked: the kernel's inotify delivers the events.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.linux import IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO, Inotify
from agent.policy_source import DirectorySource

BUDGET = 1.0  # seconds from the file change to `changed()` returning


def policy(name: str, method: str = "GET", namespace: str = "shop") -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - to: [{{operation: {{methods: ["{method}"]}}}}]
"""


INVALID = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: CUSTOM
  rules: [{}]
"""


def names(source: DirectorySource) -> list[tuple[str, tuple[str, ...]]]:
    """(name, methods of its first rule) of every document the source reads now."""
    loaded = source.read()
    assert loaded.ok, loaded.errors
    out = []
    for document in loaded.documents:
        rules = getattr(document, "rules", ())
        methods = rules[0].operations[0].methods if rules else ()
        out.append((document.name, methods))
    return out


Step = Callable[[], object]


async def changes_after(source: DirectorySource, step: Step) -> float:
    """Perform `step`; seconds until `changed()` returned; then wait until events are quiet."""
    started = time.monotonic()
    step()
    await asyncio.wait_for(source.changed(), BUDGET)
    elapsed = time.monotonic() - started
    await settle(source)
    return elapsed


async def settle(source: DirectorySource, quiet: float = 0.3) -> None:
    """Absorb the rest of a burst (a `mkdir -p` and a write may be two debounced changes)."""
    while True:
        try:
            await asyncio.wait_for(source.changed(), quiet)
        except TimeoutError:
            return


async def no_change(source: DirectorySource, within: float = 0.4) -> bool:
    try:
        await asyncio.wait_for(source.changed(), within)
    except TimeoutError:
        return True
    return False


def run(
    directory: Path, scenario: Callable[[DirectorySource], Awaitable[None]], rescan: float = 60.0
) -> None:
    async def main() -> None:
        source = DirectorySource(directory, rescan=rescan)
        source.start()
        try:
            await scenario(source)
        finally:
            source.close()

    asyncio.run(main())


def write(path: Path, text: str) -> None:
    """An editor's save: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_create_edit_in_place_rename_over_and_delete(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()

    async def scenario(source: DirectorySource) -> None:
        assert names(source) == []
        assert await no_change(source)  # nothing happened: nothing to report
        elapsed = await changes_after(source, lambda: write(directory / "a.yaml", policy("a")))
        assert elapsed < BUDGET and names(source) == [("a", ("GET",))]
        in_place = directory / "b.yml"
        await changes_after(source, lambda: in_place.write_text(policy("b", "PUT")))
        assert names(source) == [("a", ("GET",)), ("b", ("PUT",))]
        elapsed = await changes_after(source, lambda: in_place.write_text(policy("b", "POST")))
        assert elapsed < BUDGET and names(source) == [("a", ("GET",)), ("b", ("POST",))]
        await changes_after(source, lambda: write(directory / "a.yaml", policy("a", "DELETE")))
        assert names(source) == [("a", ("DELETE",)), ("b", ("POST",))]
        await changes_after(source, (directory / "a.yaml").unlink)
        assert names(source) == [("b", ("POST",))]
        await changes_after(source, lambda: os.chmod(in_place, 0o600))  # attrib counts too
        (directory / "notes.txt").write_text("not a policy")  # an event, but nothing to load
        await settle(source)
        assert names(source) == [("b", ("POST",))]

    run(directory, scenario)


def test_a_burst_of_events_is_one_change(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()

    async def scenario(source: DirectorySource) -> None:
        started = time.monotonic()
        for i in range(20):
            write(directory / f"p{i}.yaml", policy(f"p{i}"))
        await asyncio.wait_for(source.changed(), BUDGET)
        assert time.monotonic() - started < BUDGET
        assert len(names(source)) == 20
        assert await no_change(source)  # the whole burst was one change

    run(directory, scenario)


def configmap_version(directory: Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet's atomic writer does: a new timestamped directory, a `..data_tmp` symlink
    to it renamed over `..data`, user-visible names as symlinks through `..data`, the old
    version removed."""
    target = directory / f"..2025_01_01_{version}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    (directory / "..data_tmp").symlink_to(target.name)
    os.rename(directory / "..data_tmp", directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(directory / old)


def test_a_configmap_symlink_swap_is_a_change(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    configmap_version(directory, "v1", {"policy.yaml": policy("cm", "GET")})

    async def scenario(source: DirectorySource) -> None:
        assert names(source) == [("cm", ("GET",))]  # `..data` and `..2025...` are not read
        elapsed = await changes_after(
            source, lambda: configmap_version(directory, "v2", {"policy.yaml": policy("cm", "PUT")})
        )
        assert elapsed < BUDGET and names(source) == [("cm", ("PUT",))]

    run(directory, scenario)


def test_the_swap_alone_is_seen(tmp_path: Path) -> None:
    """Only the rename of `..data` happens in the watched directory itself (the new version's
    directory is made first, and the user-visible symlinks do not change)."""
    directory = tmp_path / "policies"
    directory.mkdir()
    configmap_version(directory, "v1", {"policy.yaml": policy("cm", "GET")})
    staged = directory / "..2025_01_01_v2"

    async def scenario(source: DirectorySource) -> None:
        staged.mkdir()
        (staged / "policy.yaml").write_text(policy("cm", "PATCH"))
        (directory / "..data_tmp").symlink_to(staged.name)
        await settle(source)

        def swap() -> None:
            os.rename(directory / "..data_tmp", directory / "..data")

        elapsed = await changes_after(source, swap)
        assert elapsed < BUDGET and names(source) == [("cm", ("PATCH",))]

    run(directory, scenario)


def test_a_missing_directory_is_no_policy_and_is_watched_for_appearing(tmp_path: Path) -> None:
    directory = tmp_path / "etc" / "ferry" / "policies"

    async def scenario(source: DirectorySource) -> None:
        assert source.read().ok and names(source) == []

        def appear() -> None:
            directory.mkdir(parents=True)
            (directory / "a.yaml").write_text(policy("a"))

        elapsed = await changes_after(source, appear)
        assert elapsed < BUDGET and names(source) == [("a", ("GET",))]
        # the directory itself is watched now
        await changes_after(source, lambda: (directory / "a.yaml").write_text(policy("a", "PUT")))
        assert names(source) == [("a", ("PUT",))]
        await changes_after(source, lambda: shutil.rmtree(directory))
        assert names(source) == []  # gone again: no policy
        await changes_after(source, lambda: appear())
        assert names(source) == [("a", ("GET",))]

    run(directory, scenario)


def test_a_replaced_directory_is_watched_again(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "a.yaml").write_text(policy("a"))
    fresh = tmp_path / "policies.new"
    fresh.mkdir()
    (fresh / "b.yaml").write_text(policy("b"))

    async def scenario(source: DirectorySource) -> None:
        def replace_directory() -> None:
            os.rename(directory, tmp_path / "policies.old")
            os.rename(fresh, directory)

        await changes_after(source, replace_directory)
        assert names(source) == [("b", ("GET",))]
        await changes_after(source, lambda: (directory / "c.yaml").write_text(policy("c")))
        assert names(source) == [("b", ("GET",)), ("c", ("GET",))]
        # the old directory is not watched any more
        (tmp_path / "policies.old" / "z.yaml").write_text(policy("z"))
        assert await no_change(source)

    run(directory, scenario)


def test_a_swapped_directory_symlink_is_seen(tmp_path: Path) -> None:
    """`policy.directory` a symlink to a versioned directory, swapped by renaming a new link
    over it: nothing happens inside either directory, only in the parent."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "a.yaml").write_text(policy("a"))
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "a.yaml").write_text(policy("a", "PUT"))
    directory = tmp_path / "policies"
    directory.symlink_to("v1")

    async def scenario(source: DirectorySource) -> None:
        assert names(source) == [("a", ("GET",))]

        def swap() -> None:
            (tmp_path / "link.tmp").symlink_to("v2")
            os.rename(tmp_path / "link.tmp", directory)

        await changes_after(source, swap)
        assert names(source) == [("a", ("PUT",))]
        await changes_after(source, lambda: (tmp_path / "v2" / "b.yaml").write_text(policy("b")))
        assert names(source) == [("a", ("PUT",)), ("b", ("GET",))]

    run(directory, scenario)


def test_the_rescan_returns_without_events_and_rearms_on_a_new_directory(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    target = tmp_path / "elsewhere.yaml"
    target.write_text(policy("a"))
    (directory / "a.yaml").symlink_to(target)

    async def scenario(source: DirectorySource) -> None:
        target.write_text(policy("a", "PUT"))  # through a symlink: no event in the directory
        started = time.monotonic()
        await asyncio.wait_for(source.changed(), 2.0)  # the rescan
        assert 0.4 <= time.monotonic() - started < 2.0
        assert names(source) == [("a", ("PUT",))]

    run(directory, scenario, rescan=0.5)


def test_invalid_documents_are_reported_with_file_and_field(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "good.yaml").write_text(policy("good"))
    (directory / "bad.yaml").write_text(INVALID)
    loaded = DirectorySource(directory).read()
    assert [d.name for d in loaded.documents] == ["good"]
    [error] = loaded.errors
    assert error.file == str(directory / "bad.yaml") and error.field == "spec.action"
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    [error] = DirectorySource(not_a_directory).read().errors
    assert "not a directory" in error.reason


def test_inotify_reports_names_and_renames(tmp_path: Path) -> None:
    with Inotify() as inotify:
        assert inotify.read() == []  # never blocks
        wd = inotify.add_watch(tmp_path, IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO)
        (tmp_path / "a").write_text("x")
        os.rename(tmp_path / "a", tmp_path / "b")
        events = inotify.read()
        assert [(e.wd, e.name) for e in events] == [(wd, "a"), (wd, "a"), (wd, "b")]
        assert [e.mask for e in events] == [IN_CREATE, IN_CLOSE_WRITE, IN_MOVED_TO]
        inotify.rm_watch(wd)
        inotify.rm_watch(wd)  # again: no error
        with pytest.raises(FileNotFoundError):
            inotify.add_watch(tmp_path / "absent", IN_CREATE)
