// Drawing on canvases: the image, a map in colour over it, boxes, labels, fixation points,
// and the colour bar. Maps arrive on the network's grid and are stretched onto the image
// here (drawImage's bilinear stretch maps pixel centres onto pixel centres, as the service's
// own resize does), so nothing image-sized ever travels or is kept.

/** JET as OpenCV draws it (within one level of cv2.COLORMAP_JET), [r, g, b] per 0..255. */
export const JET = Array.from({ length: 256 }, (_, i) => {
  const x = i / 255;
  const ramp = (c) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - c))));
  return [ramp(3), ramp(2), ramp(1)];
});

// One colour per label (Okabe–Ito, distinguishable with the common colour-vision
// deficiencies), drawn with a dark edge so that boxes read on bright and dark lung alike.
export const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#cc79a7", "#d55e00",
                        "#0072b2", "#ffffff"];
export const AGNOSTIC = "#ffffff";  // class-agnostic maps (CRM over every output node)

export const classColour = (index) => (index == null ? AGNOSTIC : PALETTE[index % PALETTE.length]);

/** Size a canvas for an image of (width, height) at a CSS width, in device pixels. */
export function sizeCanvas(canvas, cssWidth, width, height) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(cssWidth * ratio));
  const h = Math.max(1, Math.round(cssWidth * ratio * height / width));
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  canvas.style.aspectRatio = `${width} / ${height}`;
}

/** The image (an ImageBitmap of any size) stretched over the whole canvas. */
export function drawImage(canvas, bitmap) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (bitmap) ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
}

/** A map's colour layer on its own grid: JET of the 8-bit strength, with the strength as
 *  its alpha. Made once per map; every redraw only stretches it. */
export function mapLayer(strength, gridHeight, gridWidth) {
  const layer = new OffscreenCanvas(gridWidth, gridHeight);
  const pixels = new ImageData(gridWidth, gridHeight);
  const data = pixels.data;
  for (let i = 0; i < strength.length; i++) {
    const [r, g, b] = JET[strength[i]];
    data[4 * i] = r; data[4 * i + 1] = g; data[4 * i + 2] = b; data[4 * i + 3] = strength[i];
  }
  layer.getContext("2d").putImageData(pixels, 0, 0);
  return layer;
}

/** A map's layer stretched over what the canvas shows: each pixel becomes
 *  image·(1 − w) + colour·w with w = opacity · strength / 255. */
export function drawMap(canvas, layer, opacity) {
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.globalAlpha = opacity;
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "low";  // bilinear, as the service stretches maps
  ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
  ctx.restore();
}

/** Boxes (original-image pixels) in a colour, each with an optional text label. Labels
 *  already on the canvas (``placed``, shared between calls) are not covered where a free
 *  place is left: above the box, inside its top, below it. */
export function drawBoxes(canvas, boxes, imageWidth, imageHeight, colour,
                          { dashed = false, placed = [] } = {}) {
  const ctx = canvas.getContext("2d");
  const sx = canvas.width / imageWidth, sy = canvas.height / imageHeight;
  const ratio = window.devicePixelRatio || 1;
  const line = 2 * ratio;
  ctx.save();
  ctx.font = `600 ${Math.round(12 * ratio)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const { box, text } of boxes) {
    const [x0, y0, x1, y1] = box;
    const x = x0 * sx, y = y0 * sy, w = (x1 - x0) * sx, h = (y1 - y0) * sy;
    ctx.setLineDash(dashed ? [4 * ratio, 3 * ratio] : []);
    ctx.lineWidth = line + 2 * ratio;  // the dark edge
    ctx.strokeStyle = "rgba(0, 0, 0, 0.85)";
    ctx.strokeRect(x + line / 2, y + line / 2, Math.max(0, w - line), Math.max(0, h - line));
    ctx.lineWidth = line;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x + line / 2, y + line / 2, Math.max(0, w - line), Math.max(0, h - line));
    if (text) {
      ctx.setLineDash([]);
      const pad = 3 * ratio, tw = ctx.measureText(text).width + 2 * pad, th = 16 * ratio;
      const tx = Math.min(Math.max(0, x), Math.max(0, canvas.width - tw));
      const fits = (ty) => ty >= 0 && ty + th <= canvas.height;
      const free = (ty) => !placed.some((p) => tx < p.x + p.w && p.x < tx + tw && ty < p.y + p.h && p.y < ty + th);
      const options = [y - th, y + line, y + h].filter(fits);
      const ty = options.find(free) ?? options[0] ?? 0;
      placed.push({ x: tx, y: ty, w: tw, h: th });
      ctx.fillStyle = colour;
      ctx.fillRect(tx, ty, tw, th);
      ctx.fillStyle = "#000";
      ctx.fillText(text, tx + pad, ty + 2 * ratio);
    }
  }
  ctx.restore();
}

/** Fixation points (original-image pixel indices; drawn at the pixel's centre). */
export function drawPoints(canvas, points, imageWidth, imageHeight, colour) {
  const ctx = canvas.getContext("2d");
  const sx = canvas.width / imageWidth, sy = canvas.height / imageHeight;
  const ratio = window.devicePixelRatio || 1;
  ctx.save();
  ctx.fillStyle = colour;
  ctx.strokeStyle = "#000";
  ctx.lineWidth = ratio;
  for (const [x, y] of points) {
    ctx.beginPath();
    ctx.arc((x + 0.5) * sx, (y + 0.5) * sy, 2 * ratio, 0, 2 * Math.PI);
    ctx.fill();
    ctx.stroke();
  }
  ctx.restore();
}

/** A message in the middle of a canvas (e.g. no finding at this threshold). */
export function drawNotice(canvas, text) {
  const ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  ctx.save();
  ctx.font = `600 ${Math.round(14 * ratio)}px system-ui, sans-serif`;
  const w = ctx.measureText(text).width + 16 * ratio, h = 24 * ratio;
  const x = (canvas.width - w) / 2, y = canvas.height - h - 8 * ratio;
  ctx.fillStyle = "rgba(0, 0, 0, 0.75)";
  ctx.fillRect(x, y, w, h);
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + 8 * ratio, y + h / 2);
  ctx.restore();
}

/** The colour bar: JET from 0 (left) to 1 (right), with the region threshold marked. */
export function drawColourBar(canvas, threshold) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const bar = ctx.createImageData(width, height);
  for (let x = 0; x < width; x++) {
    const [r, g, b] = JET[Math.round(255 * x / Math.max(1, width - 1))];
    for (let y = 0; y < height; y++) {
      const i = 4 * (y * width + x);
      bar.data[i] = r; bar.data[i + 1] = g; bar.data[i + 2] = b; bar.data[i + 3] = 255;
    }
  }
  ctx.putImageData(bar, 0, 0);
  const x = Math.round(threshold * (width - 1));
  ctx.fillStyle = "#000";
  ctx.fillRect(x - 1, 0, 3, height);
  ctx.fillStyle = "#fff";
  ctx.fillRect(x, 0, 1, height);
}
