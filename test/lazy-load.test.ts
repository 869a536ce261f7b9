// The consul-grpc certificate source's dependencies (gRPC, protobuf, the CSR encoder) are loaded
// only when that source is used: the other sources start faster and hold less heap.
import t from 'tap'
import { createRequire } from 'node:module'

const loaded = (): string[] => Object.keys(createRequire(__filename).cache)
  .filter((file) => /node_modules[\\/](@grpc|protobufjs|@peculiar)[\\/]/.test(file))

t.test('loading the plugin loads no gRPC, protobuf or ASN.1 module; the consul-grpc source does', async (t) => {
  await import('../lib/index')
  t.same(loaded(), [], 'nothing of the consul-grpc source after loading the plugin')
  await import('../lib/certificates/consul-grpc')
  t.ok(loaded().some((file) => file.includes('@grpc')), 'the module itself brings them (the check can see them)')
})
