"""The shipped prompt set as a TFDS dataset (`lsp_prompts`), written in the array_record format.

Build it once (offline, no TensorFlow), then read it with `load_prompts('tfds:lsp_prompts',
data_dir=DIR)`:

    python -m lsp_jax.data.tfds_prompts --data_dir DIR

Importing this module registers the builder `lsp_prompts` with TFDS.
"""

import argparse
import sys

import numpy as np
import tensorflow_datasets as tfds

from lsp_jax import data

NAME = "lsp_prompts"
SPLIT = "test"
# array_record is the only file format TFDS writes and reads without TensorFlow.
FILE_FORMAT = "array_record"


class LspPrompts(tfds.core.GeneratorBasedBuilder):
    """lsp_jax's evaluation prompts: text, AlpacaEval-style category, position in the file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "260 prompts in five categories."}
    # No code folder with checksums or metadata files. Setting None also skips a TFDS lookup
    # that imports the `importlib_resources` backport, absent on Python >= 3.9 installs.
    code_path = None

    def _info(self):
        # DatasetInfo directly: `dataset_info_from_configs` wants a per-dataset folder layout.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Original evaluation prompts shipped with lsp_jax (data/prompts.jsonl).",
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "category": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
            license="Apache-2.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the prompts ship with the package.
        return {SPLIT: self._generate_examples(data.SHIPPED_PROMPTS)}

    def _generate_examples(self, path):
        for index, prompt in enumerate(data.read_jsonl_prompts(path)):
            yield index, {"prompt": prompt.text, "category": prompt.category, "index": index}


def build(data_dir):
    """Prepares `lsp_prompts` under data_dir in the array_record format; returns 'tfds:NAME'."""
    builder = LspPrompts(data_dir=data_dir, file_format=FILE_FORMAT)
    builder.download_and_prepare()
    return data.TFDS_PREFIX + NAME


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write to.")
    args = parser.parse_args(argv)
    source = build(args.data_dir)
    print(f"Prepared {source} in {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
