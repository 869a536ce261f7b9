// A ConnectCAService a test controls completely: which roots it streams and when, whether Sign
// certifies, refuses or certifies another identity, and when streams end. For the behaviours a
// dev agent would not produce on its own (a server that ends its stream, refuses later, lies).
import { EventEmitter, once } from 'node:events'
import * as grpc from '@grpc/grpc-js'
import { connectCA } from '../../lib/certificates/connectca'
import type { SignRequest, SignResponse, WatchRootsResponse } from '../../lib/certificates/connectca'
import { parseCsr } from '../../lib/certificates/csr'
import { DevCertificateAuthority } from '../../lib/dev-agent/ca'
import { rootsMessage as devRootsMessage } from '../../lib/dev-agent/grpc'
import type { Tap } from './mesh'

export type SignMode = 'sign' | { refuse: grpc.status, details: string } | { uri: string }

export interface FakeConnectCA {
  readonly address: string
  readonly ca: DevCertificateAuthority
  readonly events: EventEmitter
  calls: { watchRoots: number, sign: number }
  signMode: SignMode
  /** While set, Sign answers only once it resolves. */
  signGate: Promise<void> | null
  /** Tokens seen in `x-consul-token`, per call. */
  tokens: Array<string | undefined>
  /** The roots message of the CA, with `change` applied. */
  rootsMessage (change?: Partial<WatchRootsResponse>): WatchRootsResponse
  /** Sends a message to every open WatchRoots stream. */
  push (message: WatchRootsResponse): void
  /** Ends every open stream with status OK. */
  endStreams (): void
}

export async function startFakeConnectCA (t: Tap, opts: { initial?: (ca: DevCertificateAuthority) => WatchRootsResponse | null } = {}): Promise<FakeConnectCA> {
  const ca = await DevCertificateAuthority.create()
  const streams = new Set<grpc.ServerWritableStream<object, WatchRootsResponse>>()
  const events = new EventEmitter()
  const server = new grpc.Server()
  const rootsMessage = (change: Partial<WatchRootsResponse> = {}): WatchRootsResponse => ({ ...devRootsMessage(ca), ...change })
  const fake: FakeConnectCA = {
    address: '',
    ca,
    events,
    calls: { watchRoots: 0, sign: 0 },
    signMode: 'sign',
    signGate: null,
    tokens: [],
    rootsMessage,
    push: (message) => { for (const call of streams) call.write(message) },
    endStreams: () => {
      for (const call of streams) call.end()
      streams.clear()
    }
  }
  server.addService(connectCA().service, {
    WatchRoots: (call: grpc.ServerWritableStream<object, WatchRootsResponse>) => {
      fake.calls.watchRoots++
      fake.tokens.push(call.metadata.get('x-consul-token')[0] as string | undefined)
      streams.add(call)
      call.on('cancelled', () => streams.delete(call))
      const first = opts.initial === undefined ? rootsMessage() : opts.initial(ca)
      if (first !== null) call.write(first)
      events.emit('watch', fake.calls.watchRoots)
    },
    Sign: (call: grpc.ServerUnaryCall<SignRequest, SignResponse>, callback: grpc.sendUnaryData<SignResponse>) => {
      fake.calls.sign++
      fake.tokens.push(call.metadata.get('x-consul-token')[0] as string | undefined)
      const mode = fake.signMode
      if (typeof mode === 'object' && 'refuse' in mode) {
        callback({ code: mode.refuse, details: mode.details, name: 'Error', message: mode.details })
        events.emit('sign', fake.calls.sign)
        return
      }
      const csr = parseCsr(call.request.csr)
      events.emit('sign-request', fake.calls.sign)
      Promise.resolve(fake.signGate).then(async () => await ca.signPublicKey(csr.publicKeySpki, mode === 'sign' ? csr.uris[0] as string : mode.uri)).then((signed) => {
        callback(null, { certPem: signed.certPem })
        events.emit('sign', fake.calls.sign)
      }, (err: Error) => callback(err))
    }
  })
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, bound) => err === null ? resolve(bound) : reject(err))
  })
  ;(fake as { address: string }).address = `127.0.0.1:${port}`
  t.teardown(async () => {
    fake.endStreams()
    server.forceShutdown()
  })
  return fake
}

/** Resolves when the fake has seen its `n`th call of `kind`. */
export async function nthCall (fake: FakeConnectCA, kind: 'watch' | 'sign', n: number): Promise<void> {
  while ((kind === 'watch' ? fake.calls.watchRoots : fake.calls.sign) < n) await once(fake.events, kind)
}
