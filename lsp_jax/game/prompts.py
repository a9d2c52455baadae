"""Default wording of the Challenger and quality-judge prompts (overridable in config).

The judge's format line spells out every possible score tag (<Score>0</Score> ...
<Score>7</Score>): with a placeholder letter (`<Score>s</Score>`) "s" was a top next
token after `<Score>` and SmolLM2 put only ~41 % of its mass on the digits; with one
example value the mass rises but piles onto that value. Spelling all eight gives ~89 %
(benchmarks/judge_digit_mass.py).

Slots are filled with plain string replacement, so a user's prompt may contain other
curly braces (templates such as "{question}" are part of the Challenger's task).
"""

CHALLENGER_PROMPT = """\
A language task can be described by pairs of an input and the output a capable \
assistant should give for it. Two examples:
- Task "Translate English to French": the input "Where is the train station?" has the \
output "Où est la gare ?".
- Task "Arithmetic word problems": the input "A box holds 12 eggs. How many eggs are \
in 7 boxes?" has the output "84".

Your job is to write exactly ONE input for the task "{task}". A different assistant \
will receive your input and try to complete it. The input may be easy, of medium \
difficulty, hard, or deliberately noisy; its purpose is to probe and stress-test that \
assistant, so make it genuinely informative about what the assistant can and cannot do.

Fill in this template, replacing every placeholder in curly braces, and copy nothing \
else from these instructions: {template}

Rules: do not write the answer, do not give hints, and do not ask for anything a \
text-only assistant cannot do (browsing, running programs, seeing images, acting in \
the world). If the task and the template above are empty, choose the kind of input \
yourself. Reply with the input only."""

JUDGE_PROMPT = """\
Rate how well an AI assistant handled a user's message. Check each of the seven \
criteria below and add one point for every criterion that holds.

1. The user's task can be clearly identified.
2. The user's instruction is clear, specific and well structured.
3. The user will understand the assistant's response.
4. The response addresses a substantial part of the user's question.
5. The response answers the core of the question usefully and comprehensively.
6. The response is clear, concise, well organized and helpful.
7. The user is likely to be pleased with the form and style of the response.

<User>
{instruction}
</User>

<Assistant>
{response}
</Assistant>

First justify your rating briefly (at most 100 words). Then write the sum as \
<Calculation>a+b+c+d+e+f+g=total</Calculation> and end with the total in score tags, \
which is exactly one of <Score>0</Score>, <Score>1</Score>, <Score>2</Score>, \
<Score>3</Score>, <Score>4</Score>, <Score>5</Score>, <Score>6</Score> or \
<Score>7</Score>."""

SCORE_TAG = "<Score>"


def fill(prompt: str, **slots: str) -> str:
    """Replaces each `{name}` in `prompt` by its value (other braces untouched)."""
    for name, value in slots.items():
        prompt = prompt.replace("{" + name + "}", value)
    return prompt
