// Maps as numbers: .npy decoding, normalisation, the display blur and the region boxes.
//
// The page asks for every map as raw float32 (.npy) on the network's input grid, so the
// region threshold can be re-applied here without a new request. The steps are the
// service's own (service/methods/maps.py, service/methods/regions.py), in the same order and
// in float32 where the service compares, so a box drawn here is the box /explain returns
// for the same region_threshold.

// Methods whose maps live on the network's input grid (pixel-level gradients, fixation
// densities). Their regions come from the map's local energy (σ = 2 % of the grid's
// diagonal) and their pictures show its local magnitude (σ = 1 %); CAM-type maps are used
// as they are. tests/api/test_demo_page.py keeps this in step with service/methods.
export const INPUT_GRID_METHODS = new Set(["guided_backprop", "guided_gradcam", "fixations",
  "fixations_summed"]);
export const MAX_REGIONS = 10;
const EDGE = 1e-9;  // service/methods/regions.py: _EDGE

/** base64 → bytes. */
export function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** A little-endian float32 C-order .npy of two dimensions → {values, height, width}. */
export function parseNpy(bytes) {
  const magic = String.fromCharCode(...bytes.subarray(0, 6));
  if (magic !== "\x93NUMPY") throw new Error("not a .npy map");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = (major === 1 ? 10 : 12) + headerLength;
  const header = new TextDecoder("latin1").decode(bytes.subarray(major === 1 ? 10 : 12, start));
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`unexpected .npy header ${header.trim()}`);
  }
  const shape = /'shape':\s*\((\d+),\s*(\d+)\)/.exec(header);
  if (!shape) throw new Error(`not a 2-D map: ${header.trim()}`);
  const height = Number(shape[1]), width = Number(shape[2]);
  // A copy: the data offset need not be 4-byte aligned within the decoded buffer.
  const values = new Float32Array(bytes.slice(start, start + 4 * height * width).buffer);
  if (values.length !== height * width) throw new Error("truncated .npy map");
  return { values, height, width };
}

/** |map| ÷ its maximum, in float32 as numpy computes it (all zeros stay zeros). */
export function normalise(values) {
  let peak = 0;
  for (const v of values) { const m = Math.abs(v); if (m > peak) peak = m; }
  const out = new Float32Array(values.length);
  if (!(peak > 0) || !Number.isFinite(peak)) return out;
  for (let i = 0; i < values.length; i++) out[i] = Math.abs(values[i]) / peak;
  return out;
}

/** OpenCV's GaussianBlur of a float map with ksize (0, 0): kernel ±4σ, reflected borders
 *  (BORDER_REFLECT_101), rows first, then columns. */
export function smooth(values, height, width, sigma) {
  const size = Math.round(sigma * 8 + 1) | 1;
  const half = (size - 1) / 2;
  const kernel = new Float64Array(size);
  let sum = 0;
  for (let i = 0; i < size; i++) { kernel[i] = Math.exp(-((i - half) ** 2) / (2 * sigma * sigma)); sum += kernel[i]; }
  for (let i = 0; i < size; i++) kernel[i] /= sum;
  const rows = new Float32Array(values.length);
  const line = new Float64Array(Math.max(width, height) + 2 * half);
  const pass = (source, target, count, length, stride, step) => {
    const reflected = reflection(length, half);
    for (let n = 0; n < count; n++) {
      const base = n * stride;
      for (let j = 0; j < reflected.length; j++) line[j] = source[base + reflected[j] * step];
      for (let i = 0; i < length; i++) {
        let acc = 0;
        for (let k = 0; k < size; k++) acc += kernel[k] * line[i + k];
        target[base + i * step] = acc;
      }
    }
  };
  pass(values, rows, height, width, width, 1);
  const out = new Float32Array(values.length);
  pass(rows, out, width, height, 1, width);
  return out;
}

/** Indices 0..length-1 padded by ``half`` on each side, mirrored without repeating the edge
 *  (OpenCV's BORDER_REFLECT_101: gfedcb|abcdefgh|gfedcba). */
function reflection(length, half) {
  const out = new Int32Array(length + 2 * half);
  for (let j = 0; j < out.length; j++) {
    let i = j - half;
    if (length === 1) i = 0;
    while (i < 0 || i >= length) i = i < 0 ? -i : 2 * length - 2 - i;
    out[j] = i;
  }
  return out;
}

const diagonal = (height, width) => Math.hypot(height, width);

/** The map that region boxes are cut from: max-normalised; input-grid maps first blurred
 *  to their local energy (σ = 2 % of the diagonal) and normalised again. */
export function regionStrength(method, values, height, width) {
  const strength = normalise(values);
  if (!INPUT_GRID_METHODS.has(method)) return strength;
  return normalise(smooth(strength, height, width, 0.02 * diagonal(height, width)));
}

/** What a picture of the map shows, 8-bit: |map| max-normalised; input-grid maps as their
 *  local magnitude (σ = 1 % of the diagonal), as the service's overlays draw them. */
export function displayStrength(method, values, height, width) {
  const shown = INPUT_GRID_METHODS.has(method)
    ? normalise(smooth(normalise(values), height, width, 0.01 * diagonal(height, width)))
    : normalise(values);
  const out = new Uint8ClampedArray(shown.length);
  for (let i = 0; i < shown.length; i++) out[i] = Math.round(shown[i] * 255);
  return out;
}

/** Boxes [x0, y0, x1, y1] (original-image pixels, x1 and y1 exclusive) around the
 *  8-connected components of strength > threshold, largest peak first, at most ten.
 *  scaleX, scaleY: image pixels per grid pixel. */
export function regions(strength, height, width, threshold, scaleX, scaleY) {
  const cut = Math.fround(threshold);  // numpy compares a float32 map in float32
  const label = new Int32Array(strength.length);
  const stack = new Int32Array(strength.length);
  const found = [];
  let next = 0;
  for (let start = 0; start < strength.length; start++) {
    if (label[start] || !(strength[start] > cut)) continue;
    next += 1;
    let x0 = width, y0 = height, x1 = -1, y1 = -1, peak = 0, top = 0;
    stack[top++] = start;
    label[start] = next;
    while (top) {
      const i = stack[--top];
      const x = i % width, y = (i - x) / width;
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
      if (strength[i] > peak) peak = strength[i];
      for (let dy = -1; dy <= 1; dy++) {
        const ny = y + dy;
        if (ny < 0 || ny >= height) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const nx = x + dx;
          if (nx < 0 || nx >= width) continue;
          const j = ny * width + nx;
          if (!label[j] && strength[j] > cut) { label[j] = next; stack[top++] = j; }
        }
      }
    }
    found.push({  // EDGE: an edge on a whole pixel, missed by a rounding error (regions.py)
      box: [Math.floor(x0 * scaleX + EDGE), Math.floor(y0 * scaleY + EDGE),
            Math.ceil((x1 + 1) * scaleX - EDGE), Math.ceil((y1 + 1) * scaleY - EDGE)],
      score: Math.round(peak * 1e4) / 1e4,
    });
  }
  // Components are numbered in raster order, as OpenCV numbers them; the sort is stable.
  found.sort((a, b) => b.score - a.score);
  return found.slice(0, MAX_REGIONS);
}
