"""Regenerate notebooks/walkthrough.ipynb (unexecuted). The test suite executes it."""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# smearpipe walkthrough\n\nAnalyse blood smear fields with the shipped weights, read the WBC differential "
       "with its confidence intervals, then train each stage on your own annotated data (tiny settings here so that "
       "the notebook runs in a minute on a laptop CPU; see the README for real settings).\n\n"
       "The sample fields in `datasets/bccd_samples/` are BCCD test-split fields (MIT licence)."),
    code("from pathlib import Path\n\nimport matplotlib.pyplot as plt\n\nimport smearpipe\nfrom smearpipe import analyze_fields, analyze_smear, draw, load_pipeline\n"
         "from smearpipe.io import read_image\n\n"
         "REPO = Path.cwd().parent if Path.cwd().name == 'notebooks' else Path.cwd()\n"
         "SAMPLES = REPO / 'datasets' / 'bccd_samples'\n"
         "print(smearpipe.__version__, sorted(p.name for p in SAMPLES.glob('*.jpg')))"),
    md("## 1. One field\n\nLoad the models once, then analyse a field (a path or an RGB uint8 array)."),
    code("pipe = load_pipeline()  # shipped detector + classifier, sha256-checked\n"
         "field = read_image(SAMPLES / 'BloodImage_00031.jpg')\n"
         "result = analyze_smear(field, pipeline=pipe)\n"
         "print('counts:', result.counts)\nprint('WBC differential:', result.differential)\n"
         "for cell in result.wbcs:\n"
         "    print(f'  WBC at {[round(v) for v in cell.box]}: {cell.wbc_type} p={cell.wbc_probability:.2f}'"
         " + (f' needs review: {cell.review_reasons}' if cell.needs_review else ''))\n"
         "print('timings (ms):', {k: round(v, 1) for k, v in result.timings_ms.items()})"),
    code("fig, ax = plt.subplots(figsize=(9, 7))\nax.imshow(draw(result, field))\nax.set_axis_off()"),
    md("Results are frozen dataclasses; `to_dict()` / `to_json()` round-trip."),
    code("from smearpipe.pipeline import SmearResult\nassert SmearResult.from_json(result.to_json()) == result\n"
         "print(result.to_json()[:300], '...')"),
    md("## 2. A slide: several fields, differential with exact 95 % confidence intervals\n\n"
       "A 100-cell manual differential is imprecise (Rümke); the Clopper-Pearson interval shows how much. "
       "`analyze_fields` streams the fields (constant memory) and reports unreadable files instead of stopping."),
    code("slide = analyze_fields(sorted(SAMPLES.glob('*.jpg')), pipeline=pipe, progress=False)\n"
         "print(slide.summary.table())\nprint('errors:', slide.errors)"),
    md("## 3. Another magnification\n\n"
       "Labs differ in objective and camera: the same cells can be 2-4x smaller or larger in pixels. Red cells "
       "(~7.5 um everywhere) are the ruler. By default (`rescale='auto'`) the detector's own red-cell boxes measure "
       "each field, and a field whose scale differs from the training fields' by more than 1.25x is detected again "
       "at the training scale; boxes stay in the field's pixels. Here a sample field is shrunk 2.5x onto an empty "
       "canvas, as a lower magnification would show it. With a known pixel size, pass "
       "`PipelineConfig(pixel_size_um=...)` instead."),
    code("import cv2\nimport numpy as np\nfrom smearpipe.pipeline import PipelineConfig\n"
         "from smearpipe.preprocess import estimate_background\n\n"
         "canvas = np.empty_like(field)\ncanvas[:] = np.round(estimate_background(field)).astype(np.uint8)  # empty glass\n"
         "canvas[144:336, 192:448] = cv2.resize(field, (256, 192), interpolation=cv2.INTER_AREA)\n"
         "for config in (PipelineConfig(rescale=False), None):  # None: the pipeline's default, rescale='auto'\n"
         "    r = analyze_smear(canvas, pipeline=pipe, config=config)\n"
         "    print('rescale=False' if config else 'default', '| scale factor', round(r.scale_factor, 2), "
         "'| detector input', r.detector_imgsz, '| counts', r.counts)"),
    md("## 4. Train the detector on your own annotated fields\n\n"
       "Convert Pascal VOC annotations (BCCD layout: `Annotations/`, `JPEGImages/`, `ImageSets/Main/<split>.txt`) "
       "to the YOLO layout, train, evaluate. Here: the bundled fields, 1 epoch at 64 px (a smoke run, not a model)."),
    code("import shutil, tempfile\nfrom smearpipe.datasets import voc_to_yolo\nfrom smearpipe.train import train_detector\n"
         "from smearpipe.evaluate import evaluate_detector\n\n"
         "work = Path(tempfile.mkdtemp())\nvoc = work / 'voc'\n"
         "for sub in ('Annotations', 'JPEGImages', 'ImageSets/Main'):\n    (voc / sub).mkdir(parents=True)\n"
         "stems = sorted(p.stem for p in SAMPLES.glob('*.jpg'))\n"
         "for s in stems:\n    shutil.copy(SAMPLES / f'{s}.jpg', voc / 'JPEGImages')\n    shutil.copy(SAMPLES / f'{s}.xml', voc / 'Annotations')\n"
         "(voc / 'ImageSets/Main/train.txt').write_text('\\n'.join(stems[:4]))\n"
         "(voc / 'ImageSets/Main/val.txt').write_text('\\n'.join(stems[4:]))\n"
         "report = voc_to_yolo(voc, work / 'yolo', splits=('train', 'val'))\nprint(report.to_dict()['boxes'])\n\n"
         "det_run = train_detector(work / 'yolo' / 'data.yaml', model='yolov8n.yaml', epochs=1, imgsz=64, batch=2,\n"
         "                         out_dir=work / 'runs', name='my_detector')\n"
         "print(det_run.weights, det_run.record)\n"
         "m = evaluate_detector(work / 'yolo' / 'data.yaml', detector=det_run.weights, split='val', out_dir=work / 'eval_det')\n"
         "print('mAP@0.5 (meaningless after 1 epoch):', round(m['map50'], 3))"),
    md("## 5. Train the WBC classifier on your own crops\n\n"
       "Cut labelled WBC crops from annotated fields (`smearpipe extract-crops` on the command line): boxes labelled "
       "with their WBC type, or `WBC` boxes with their field's label from a BCCD-style `labels.csv`. Or use any "
       "ImageFolder tree `root/<class>/<image>`. Here: the bundled fields' crops, split as above, 1 epoch at 32 px "
       "(the 2 validation crops are neutrophils: training warns that the other classes have none)."),
    code("from smearpipe.datasets import extract_wbc_crops\nfrom smearpipe.train import train_classifier\n"
         "from smearpipe.evaluate import evaluate_classifier\n\n"
         "for split in ('train', 'val'):\n"
         "    crops = extract_wbc_crops(voc, work / 'crops' / split, labels_csv=SAMPLES / 'labels.csv', split=split, scale=1.75)\n"
         "    print(split, 'crops:', crops.written, 'skipped:', crops.skipped)\n"
         "clf_run = train_classifier(work / 'crops' / 'train', work / 'crops' / 'val', classes=('lymphocyte', 'monocyte', 'neutrophil'),\n"
         "                           input_size=32, epochs=1, batch_size=2, out_dir=work / 'runs', name='my_classifier', num_workers=0)\n"
         "ev = evaluate_classifier(work / 'crops' / 'val', classifier=clf_run.weights, out_dir=work / 'eval_clf')\n"
         "print('figures:', ev['figures'])"),
    md("## 6. Use your own models in the pipeline\n\n"
       "`train_detector` records the scale of its training fields. A detector that finds no red cells yet (as "
       "after one epoch here) cannot measure fields; the pipeline then warns and sees fields as they are."),
    code("mine = load_pipeline(detector=det_run.weights, classifier=clf_run.weights)\n"
         "r = analyze_smear(SAMPLES / 'BloodImage_00007.jpg', pipeline=mine)\n"
         "print(r.models)\nshutil.rmtree(work)"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
out = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
nbf.write(nb, out)
print(out)
