"""Peak memory of ingesting one large patient, against the bytes of its stored voxels.

Writes a synthetic int16 CT (default 512 x 512 x 600 at 0.7 x 0.7 x 1 mm, 315 MB of
voxels; with a NIfTI intercept of -1024, as scanners write them) and a uint8 lesion mask of
the same grid, then preprocesses the patient as `unicon-tf ingest` does
(`unicon_tf.data.examples.process_patient`, 64^3 crop at 3 mm) in a fresh process, and prints
the peak of NumPy's allocations during it (`tracemalloc`) and the process's peak resident
memory growth, each over the CT's stored voxel bytes. Goal (issue 23): peak <= 3x.

    python benchmarks/ingest_memory.py                     # 512 x 512 x 600
    python benchmarks/ingest_memory.py --x 256 --y 256 --z 300
"""

import json
import pathlib
import resource
import subprocess
import sys
import tempfile

import numpy as np

from common import integer_options

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_patient(folder, shape):
    """An int16 CT (air, a body ellipsoid, a lesion) and its uint8 mask; returns the manifest."""
    import nibabel as nib

    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    x, y, z = (np.arange(n, dtype=np.float32) / n - 0.5 for n in shape)
    ct = np.full(shape, -1000 + 1024, np.int16)  # stored values; intercept -1024
    for k in range(shape[2]):  # slab by slab: the writer's own memory stays small
        inside = (x[:, None] / 0.45) ** 2 + (y[None, :] / 0.35) ** 2 <= 1.0
        ct[:, :, k][inside] = 40 + 1024
    lesion = np.zeros(shape, np.uint8)
    c = [n // 2 for n in shape]
    lesion[c[0] - 20:c[0] + 20, c[1] - 20:c[1] + 20, c[2] - 15:c[2] + 15] = 1
    ct[lesion > 0] = 120 + 1024
    image = nib.Nifti1Image(ct, affine)
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, str(folder / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lesion, affine), str(folder / "mask.nii.gz"))
    manifest = folder / "manifest.csv"
    manifest.write_text("patient_id,split,ct,mask\nP0,train,ct.nii.gz,mask.nii.gz\n")
    return manifest, ct.nbytes, lesion.nbytes


def measure(manifest):
    """In this process: `(tracemalloc peak bytes, ru_maxrss growth bytes, seconds)` of one patient."""
    import time
    import tracemalloc

    from unicon_tf.data import Preprocessing
    from unicon_tf.data.examples import process_patient
    from unicon_tf.data.manifest import read_manifest

    cohort = read_manifest(manifest)
    prep = Preprocessing(shape=(64, 64, 64), spacing=(3.0, 3.0, 3.0), center="mask")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    started = time.perf_counter()
    process_patient(cohort.patients[0], prep, cohort.targets)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, max(after - before, 0), seconds


def main():
    args = integer_options(__doc__, x=512, y=512, z=600)
    shape = (args.x, args.y, args.z)
    with tempfile.TemporaryDirectory() as folder:
        manifest, ct_bytes, mask_bytes = write_patient(pathlib.Path(folder), shape)
        code = (f"import sys, json; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]; "
                f"import ingest_memory; print(json.dumps(ingest_memory.measure({str(manifest)!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peak, rss, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    print(f"patient: CT {shape} int16 ({ct_bytes / mb:.0f} MiB stored voxels) + uint8 mask ({mask_bytes / mb:.0f} MiB)")
    print(f"peak NumPy allocations (tracemalloc): {peak / mb:.0f} MiB = {peak / ct_bytes:.2f}x the CT's voxel bytes, "
          f"{peak / (ct_bytes + mask_bytes):.2f}x CT + mask")
    print(f"peak resident memory growth over the imports' peak (ru_maxrss, a lower bound): {rss / mb:.0f} MiB = "
          f"{rss / ct_bytes:.2f}x the CT's voxel bytes")
    print(f"time: {seconds:.1f} s; goal: peak <= 3x the raw voxel bytes")


if __name__ == "__main__":
    main()
