"""The nine benchmarks of the paper's Table 1: where each lives on the hub, which split, and the SAYO authors'
prompt and reference answer for one row (Cratileo/Sayo eval/utils/data_loaders.py; docs/eval.md).

Prompts are pure functions of a row's fields, tested against the authors' construction in
tests/eval/test_suite_prompts.py. Column order and names follow the paper's Table 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.eval.benchmarks.hub_data import DatasetError, ImageRef, field, find_files, image_ref, read_rows

WEMATH_SUFFIX = "Your final answer must be one of A, B, C, or D."


@dataclass(frozen=True)
class SuiteSample:
    """One evaluation item: the user text after the image, the reference answer and the image.

    `convert_rgb`: the authors convert images read from files to RGB before rescaling; images decoded from the
    dataset's own cells keep their mode (PNG-encoded as they are)."""

    id: str
    question: str
    answer: str
    image: ImageRef
    convert_rgb: bool


# ------------------------------------------------------------------------------------------------ prompts

def lettered_choices(choices: list) -> str:
    """'A: first\\nB: second\\n' (every line ends with a newline, as the authors build it)."""
    return "".join(f"{chr(65 + i)}: {c}\n" for i, c in enumerate(choices))


def question_with_choices(question: str, choices: str) -> str:
    """'Question:{question}\\nChoices:{choices}' (no spaces after the colons)."""
    return f"Question:{question}\nChoices:{choices}"


def mme_realworld_prompt(text: str, answer_choices) -> str:
    """MME-RealWorld: the choices list is printed as Python prints a list (['(A) ...', '(B) ...'])."""
    return question_with_choices(text, str(answer_choices))


def mathvision_prompt(question: str, options: list) -> str:
    """MathVision: lettered options after 'Options: ' when there are any, else the bare question."""
    return f"{question}\nOptions: {lettered_choices(options)}" if options else question


def wemath_prompt(question: str, option: str) -> str:
    """We-Math: the options string and the one-of-A-to-D instruction."""
    return f"{question}\n\nOptions: {option}\n{WEMATH_SUFFIX}"


def ai2d_answer(answer) -> str:
    """AI2D stores the option index ('0'..); the reference is its letter."""
    try:
        return chr(65 + int(answer))
    except (TypeError, ValueError):
        raise DatasetError(f"AI2D answer must be an option index, got {answer!r}") from None


# ------------------------------------------------------------------------------------------------ rows -> samples

Builder = Callable[[dict, str, Path], tuple[str | None, str, str, ImageRef]]


def _mme_realworld(row, src, base):
    image = image_ref(field(row, "Image", src), base / "data" / "imgs", src, "Image")
    return (row.get("Question_id"), mme_realworld_prompt(field(row, "Text", src), field(row, "Answer choices", src,
            (list, str))), field(row, "Ground truth", src), image)


def _m3cot(row, src, base):
    text = question_with_choices(field(row, "question", src), lettered_choices(field(row, "choices", src, list)))
    return row.get("id"), text, field(row, "answer", src), image_ref(field(row, "image", src, (dict, bytes)), base,
                                                                     src, "image")


def _vstar(row, src, base):
    return (row.get("question_id"), field(row, "text", src), field(row, "label", src),
            image_ref(field(row, "image", src), base, src, "image"))


def _plain(image_field: str, question_field: str = "question", answer_field: str = "answer",
           id_field: str | None = None) -> Builder:
    """Question and answer copied as they are (MMStar, ChartQA, CharXiv)."""
    def build(row, src, base):
        return (row.get(id_field) if id_field else None, field(row, question_field, src),
                str(field(row, answer_field, src, (str, int, float))),
                image_ref(field(row, image_field, src, (dict, bytes)), base, src, image_field))
    return build


def _mathvision(row, src, base):
    text = mathvision_prompt(field(row, "question", src), field(row, "options", src, list))
    return (row.get("id"), text, str(field(row, "answer", src, (str, int))),
            image_ref(field(row, "decoded_image", src, (dict, bytes)), base, src, "decoded_image"))


def _wemath(row, src, base):
    sid = f"{field(row, 'ID', src)}@{field(row, 'key', src)}"
    return (sid, wemath_prompt(field(row, "question", src), field(row, "option", src)), field(row, "answer", src),
            image_ref(field(row, "image_path", src, (dict, bytes)), base, src, "image_path"))


def _ai2d(row, src, base):
    text = question_with_choices(field(row, "question", src), lettered_choices(field(row, "options", src, list)))
    return None, text, ai2d_answer(field(row, "answer", src, (str, int))), image_ref(
        field(row, "image", src, (dict, bytes)), base, src, "image")


# ------------------------------------------------------------------------------------------------ the suite

def split_files(split: str) -> tuple[str, ...]:
    """The hub's usual parquet names for a split: data/<split>-*.parquet, <split>-*.parquet, <split>.parquet."""
    return (f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: our name, the paper's column title, the hub dataset, its directory under the data root,
    the split the authors evaluate, the files holding it, and the row -> sample rule."""

    name: str
    title: str
    hub_id: str
    folder: str
    split: str
    files: tuple[str, ...]
    build: Builder
    images_from_files: bool = False

    def samples(self, data_root: str | Path, limit: int | None = None) -> list[SuiteSample]:
        """The split's samples in file order (the first `limit`), every row checked before any image is read."""
        base = Path(data_root) / self.folder
        out: list[SuiteSample] = []
        for path in find_files(base, self.files, f"{self.title} {self.split} split of {self.hub_id}"):
            for i, row in enumerate(read_rows(path)):
                if limit is not None and len(out) >= limit:
                    return out
                sid, question, answer, image = self.build(row, f"{path} row {i}", base)
                out.append(SuiteSample(str(sid) if sid not in (None, "") else f"{self.name}-{len(out)}", question,
                                       str(answer), image, self.images_from_files))
        if not out:
            raise DatasetError(f"{base}: the {self.split} split of {self.hub_id} has no rows")
        return out


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("mme-realworld", "MME-RealWorld", "yifanzhang114/MME-RealWorld-Lite", "MME-RealWorld-Lite", "train",
              ("data/MME-RealWorld-Lite.json", "MME-RealWorld-Lite.json"), _mme_realworld, images_from_files=True),
    Benchmark("m3cot", "M3CoT", "LightChen2333/M3CoT", "M3CoT", "test", split_files("test"), _m3cot),
    Benchmark("vstar", "V*", "craigwu/vstar_bench", "vstar_bench", "test", ("test_questions.jsonl",), _vstar,
              images_from_files=True),
    Benchmark("mmstar", "MMStar", "Lin-Chen/MMStar", "MMStar", "val", ("mmstar.parquet",) + split_files("val"),
              _plain("image", id_field="index")),
    Benchmark("mathvision", "MathVision", "MathLLMs/MathVision", "MathVision", "test", split_files("test"),
              _mathvision),
    Benchmark("wemath", "We-Math", "We-Math/We-Math", "We-Math", "testmini", split_files("testmini"), _wemath),
    Benchmark("chartqa", "ChartQA", "lmms-lab/ChartQA", "ChartQA", "test", split_files("test"), _plain("image")),
    Benchmark("ai2d", "AI2D", "lmms-lab/ai2d", "ai2d", "test", split_files("test"), _ai2d),
    Benchmark("charxiv", "CharXiv", "princeton-nlp/CharXiv", "CharXiv", "validation",
              ("val.parquet",) + split_files("validation"),
              _plain("image", "reasoning_q", "reasoning_a", id_field="original_id")),
)
BY_NAME = {b.name: b for b in BENCHMARKS}



def paper_base_rows() -> dict[str, dict[str, float | None]]:
    """The paper's Table 1 base models (Qwen3-VL-8B/4B, InternVL3.5-8B; it has no Qwen2.5-VL row) with their
    nine-benchmark average (docs/spec.md §6). Their per-benchmark cells could not be obtained here and stay None
    rather than guessed."""
    from megatron_sayo.config import SuiteConfig

    return {m: {**{b.name: None for b in BENCHMARKS}, "average": avg}
            for m, avg in SuiteConfig().paper_base_average.items()}


def select(spec: str) -> list[Benchmark]:
    """'sayo-suite' -> all nine in the paper's order; 'sayo-<name>' -> that one; else ValueError naming the choices."""
    if spec == "sayo-suite":
        return list(BENCHMARKS)
    name = spec.removeprefix("sayo-")
    if spec.startswith("sayo-") and name in BY_NAME:
        return [BY_NAME[name]]
    raise ValueError(f"unknown suite benchmark {spec!r}: use 'sayo-suite' or one of "
                     f"{', '.join('sayo-' + b.name for b in BENCHMARKS)}")


def task_name(name: str) -> str:
    """nemo-evaluator's task name of a suite benchmark (BYOB normalises 'sayo-<name>')."""
    return "sayo_" + name.replace("-", "_")
