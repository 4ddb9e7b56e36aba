"""The user text of a multiple-choice or yes/no question, as VLMEvalKit builds it.

Prompts are built the way VLMEvalKit builds them for Llama-3.2-Vision (which LLaVA-CoT's evaluation used):
- "mcq" (MMStar, MMBench, SEED, ... — `ImageMCQDataset.build_prompt` in `vlmeval/dataset/image_mcq.py`):
  `Hint: {hint}\\n` (only with a hint) `Question: {question}\\n` `Options:\\n` `A. {A}\\n` ... and
  `Please select the correct answer from the options above. \\n`;
- "ai2d" (the AI2D prompt of LLaVA-CoT's `inference/VLMEvalKit/inference_demo.py`, `build_prompt`):
  `Look at the scientific diagram carefully and answer the following question: {question}\\nA. {A}...`
  `\\nRespond only with the correct option digit.`;
- "yorn" (HallusionBench, POPE, MME — `ImageBaseDataset.build_prompt`): the question alone.
The image comes first in the user turn, the text after it, as there. A family evaluated with its own answer
instruction (LLaVA-1.5: `vicuna.MCQ_ANSWER`, its processor's `mcq_instruction`) gets it in place of the "mcq"
style's last line.
"""

from __future__ import annotations

from collections.abc import Mapping

# VLMEvalKit's closing line of an "mcq" prompt.
MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"


def build_prompt(
    question: str, options: Mapping[str, str], hint: str, style: str, instruction: str | None = None
) -> str:
    """The user text for one row, as VLMEvalKit builds it (module docstring); `instruction` replaces the "mcq"
    style's closing line."""
    if style == "yorn":
        return question
    if style == "ai2d":
        listed = "".join(f"\n{letter}. {text}" for letter, text in options.items())
        return (
            f"Look at the scientific diagram carefully and answer the following question: {question}{listed}\n"
            "Respond only with the correct option digit."
        )
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
        prompt += MCQ_INSTRUCTION if instruction is None else instruction
    return prompt
