"""The house: the optimizer library (misa/, misa_kernels/) apart from the jobs built on it (misa/jobs/), and no
import circle anywhere."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("misa", "misa_kernels")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """Every import between our modules, those inside functions and under TYPE_CHECKING included."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circle():
    graph = import_graph()
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node) :] + [node]))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_library_imports_no_job():
    jobs = {m for m in import_graph() if m.startswith("misa.jobs")}
    launchers = {"misa.train", "misa.finetune", "misa.plan"}  # `python -m misa.<job>`: each runs its job
    for name, deps in import_graph().items():
        if name not in jobs and name not in launchers:
            assert not deps & (jobs | launchers), f"{name} imports {sorted(deps & (jobs | launchers))}"


BLOCKED = """
import sys
for name in ("tqdm", "matplotlib"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
"""


def test_the_library_runs_without_the_jobs_packages():
    """`pip install misa-kernels` brings torch and numpy only: import it and train a step without matplotlib and
    tqdm, and load no job module."""
    code = (
        BLOCKED
        + """
import torch, misa
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
opt = misa.MISA(model, delta=0.6, interval=2, backend="torch", train_1d=True)
for _ in range(3):
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
loaded = sorted(m for m in sys.modules if m.startswith(("misa.jobs", "misa.train", "misa.finetune", "misa.plan")))
assert not loaded, loaded
print("ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("job", ["misa.train", "misa.finetune", "misa.plan"])
def test_a_job_without_its_packages_says_what_to_install(job, tmp_path):
    """Before any work, not at the plot an hour later: exit 2 and the extra to install, nothing written."""
    out = tmp_path / "out"
    code = (
        BLOCKED
        + f"""
import runpy
sys.argv = [{job!r}, "--out", {str(out)!r}]
runpy.run_module({job!r}, run_name="__main__")
"""
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "pip install misa-kernels[jobs]" in run.stderr and "matplotlib" in run.stderr
    assert not out.exists()


def test_the_readme_is_one_page_and_its_links_resolve():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_flags_both_jobs_take_are_defined_once():
    from misa.jobs import cli, finetune, train

    def actions(parser):
        return {a.option_strings[0]: a for a in parser._actions if a.option_strings}

    ours, theirs = actions(train.build_parser()), actions(finetune.build_parser())
    both = set(ours) & set(theirs) - {"-h"}
    assert both == set(cli.FLAGS), "a flag both jobs take is not in cli.FLAGS, or FLAGS names one they do not share"
    for flag in both:
        a, b = ours[flag], theirs[flag]
        assert (a.type, a.choices, type(a)) == (b.type, b.choices, type(b)), flag
