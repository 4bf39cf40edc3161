// The service's public API, as the page calls it: same origin, relative paths only.

/** An answer the service refused, carrying its problem+json fields. */
export class ProblemError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title || `HTTP ${status}`;
    this.detail = problem.detail || "";
    this.code = problem.code || "";
  }
}

let apiKey = "";
export const setApiKey = (key) => { apiKey = key.trim(); };
const keyHeaders = () => (apiKey ? { "X-API-Key": apiKey } : {});

/** A failed response as a ProblemError: problem+json when the service wrote it, else the
 *  status line and the start of whatever came back. */
async function refusal(response) {
  const text = await response.text();
  let problem;
  try { problem = JSON.parse(text); } catch { problem = null; }
  if (!problem || typeof problem !== "object") {
    problem = { title: `HTTP ${response.status} ${response.statusText}`.trim(), detail: text.slice(0, 300) };
  }
  return new ProblemError(response.status, problem);
}

async function call(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...keyHeaders(), ...(init.headers || {}) } });
  if (!response.ok) throw await refusal(response);
  return response;
}

export async function listModels() {
  return (await call("/models")).json();
}

export async function modelInfo(name) {
  return (await call(`/models/${encodeURIComponent(name)}`)).json();
}

/** The upload as multipart/form-data with the given parameters (empty ones left out). */
function form(file, params) {
  const data = new FormData();
  data.append("file", file);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") data.append(name, String(value));
  }
  return data;
}

/** POST /explain for JSON; resolves to {blob, body} (the answer as it came, and parsed). */
export async function explain(file, params, signal) {
  const response = await call("/explain", { method: "POST", body: form(file, params), signal,
                                            headers: { Accept: "application/json" } });
  const blob = await response.blob();
  return { blob, body: JSON.parse(await blob.text()) };
}

/** POST /explain for one DICOM object (a Secondary Capture, or the SR or presentation state
 * that dicom=sr or dicom=gsps asks for). */
export async function explainDicom(file, params) {
  const response = await call("/explain", { method: "POST", body: form(file, params),
                                            headers: { Accept: "application/dicom" } });
  return response.blob();
}
