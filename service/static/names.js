// Words for what the API names by key or UID.

const METHOD_NAMES = {
  crm: "CRM",
  crm_combined: "CRM, all classes",
  gradcam: "Grad-CAM",
  guided_backprop: "Guided backprop",
  guided_gradcam: "Guided Grad-CAM",
  fixations: "CNN Fixations",
};

export const methodName = (key) => METHOD_NAMES[key] || key;

// The transfer syntaxes a radiograph commonly arrives in (DICOM PS3.6 Table A-1).
const TRANSFER_SYNTAXES = {
  "1.2.840.10008.1.2": "Implicit VR Little Endian",
  "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
  "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
  "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
  "1.2.840.10008.1.2.4.50": "JPEG Baseline",
  "1.2.840.10008.1.2.4.51": "JPEG Extended",
  "1.2.840.10008.1.2.4.57": "JPEG Lossless",
  "1.2.840.10008.1.2.4.70": "JPEG Lossless, first-order prediction",
  "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
  "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
  "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
  "1.2.840.10008.1.2.4.91": "JPEG 2000",
  "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
  "1.2.840.10008.1.2.4.203": "HTJ2K",
  "1.2.840.10008.1.2.5": "RLE Lossless",
};

export const transferSyntaxName = (uid) => TRANSFER_SYNTAXES[uid] || "transfer syntax";
