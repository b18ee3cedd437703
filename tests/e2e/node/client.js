// A Node.js @grpc/grpc-js client of kernelmesh: loads the contract from proto/
// at run time (no generated code), calls DeviceService.ListDevices and
// TaskService.RunTask, and prints one JSON object the Python test checks.
//
// Input (JSON on stdin):
//   {"target": "127.0.0.1:50051",
//    "a": "<base64 float32 LE>", "b": "<base64 float32 LE>", "length": N}
// Output (JSON on stdout):
//   {"devices": [...], "add": {task}, "invalid": {"code", "details", "status_details_bin"}}
// Tensor bytes (Buffers) come out base64. Exit status 0 unless something
// unexpected happened (then the error goes to stderr, status 1).
// With KERNELMESH_API_KEY set, every call sends `authorization: Bearer <key>`.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT =
  process.env.KERNELMESH_PROTO_ROOT || path.resolve(__dirname, "..", "..", "..", "proto");

function loadServices() {
  const definition = protoLoader.loadSync(
    ["kernelmesh/v1/device.proto", "kernelmesh/v1/task.proto"],
    {
      includeDirs: [PROTO_ROOT],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    },
  );
  return grpc.loadPackageDefinition(definition).kernelmesh.v1;
}

function call(client, method, request, seconds = 20) {
  const deadline = new Date(Date.now() + seconds * 1000);
  const metadata = new grpc.Metadata();
  if (process.env.KERNELMESH_API_KEY) {
    metadata.set("authorization", `Bearer ${process.env.KERNELMESH_API_KEY}`);
  }
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

function tensorJson(t) {
  return { dtype: t.dtype, shape: t.shape, data: Buffer.from(t.data).toString("base64") };
}

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on("data", (c) => chunks.push(c));
    process.stdin.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    process.stdin.on("error", reject);
  });
}

async function main() {
  const input = JSON.parse(await readStdin());
  const v1 = loadServices();
  const credentials = grpc.credentials.createInsecure();
  const devices = new v1.DeviceService(input.target, credentials);
  const tasks = new v1.TaskService(input.target, credentials);
  const out = {};
  try {
    const listed = await call(devices, "ListDevices", { page_size: 100 });
    out.devices = listed.devices.map((d) => ({ name: d.name, kind: d.kind, model: d.model }));

    const tensor = (b64) => ({
      tensor: {
        dtype: "DTYPE_FLOAT32",
        shape: [input.length],
        data: Buffer.from(b64, "base64"),
      },
    });
    const run = await call(tasks, "RunTask", {
      task: { op: "add", inputs: [tensor(input.a), tensor(input.b)] },
    });
    out.add = {
      name: run.task.name,
      state: run.task.state,
      device: run.task.device,
      outputs: run.task.outputs.map(tensorJson),
    };

    // Data one element short of the shape: INVALID_ARGUMENT with a BadRequest.
    const short = tensor(input.a);
    short.tensor.data = short.tensor.data.subarray(4);
    try {
      await call(tasks, "RunTask", { task: { op: "add", inputs: [short, tensor(input.b)] } });
      out.invalid = { code: 0 };
    } catch (err) {
      const bin = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
      out.invalid = {
        code: err.code,
        details: err.details,
        status_details_bin: bin.length ? Buffer.from(bin[0]).toString("base64") : null,
      };
    }
  } finally {
    devices.close();
    tasks.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`kernelmesh node client failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
