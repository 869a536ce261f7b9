// The dev agent's gRPC port: Consul's public ConnectCAService (docs/semantics.md#dev-agent-grpc),
// so that the plugin's agentless source can be run and tested without a Consul server. WatchRoots
// streams the roots at once and after every rotation; Sign certifies a CSR for a service of this
// datacenter that the token may write.
import { createPublicKey } from 'node:crypto'
import * as grpc from '@grpc/grpc-js'
import { connectCA, CONNECT_CA_SERVICE } from '../certificates/connectca'
import type { SignRequest, SignResponse, WatchRootsResponse } from '../certificates/connectca'
import { parseCsr } from '../certificates/csr'
import { parseSpiffeId } from '../spiffe'
import { DevCertificateAuthority } from './ca'
import { DevAgentHttpError } from './http-error'
import type { DevAgentServer } from './server'

export interface DevGrpcOptions {
  host: string
  port: number
  /** Serve TLS with a certificate from a CA of its own (like Consul's agent TLS, apart from the Connect CA). */
  tls: boolean
  datacenter: string
}

export class DevGrpcServer {
  readonly #server: grpc.Server
  readonly #streams: Set<grpc.ServerWritableStream<object, WatchRootsResponse>>
  readonly port: number
  /** PEM of the CA that signed the TLS certificate; null for plaintext. */
  readonly caPem: string | null

  private constructor (server: grpc.Server, streams: Set<grpc.ServerWritableStream<object, WatchRootsResponse>>, port: number, caPem: string | null) {
    this.#server = server
    this.#streams = streams
    this.port = port
    this.caPem = caPem
  }

  static async start (agent: DevAgentServer, opts: DevGrpcOptions): Promise<DevGrpcServer> {
    const server = new grpc.Server()
    let credentials = grpc.ServerCredentials.createInsecure()
    let caPem: string | null = null
    if (opts.tls) {
      const tlsCa = await DevCertificateAuthority.create({ datacenter: opts.datacenter })
      const cert = await tlsCa.issueCertificate({ dnsNames: ['localhost', `server.${opts.datacenter}.consul`], commonName: `server.${opts.datacenter}.consul`, extKeyUsage: ['serverAuth'] })
      caPem = (tlsCa.roots()[0] as { RootCert: string }).RootCert
      credentials = grpc.ServerCredentials.createSsl(null, [{ cert_chain: Buffer.from(cert.certPem), private_key: Buffer.from(cert.privateKeyPem) }], false)
    }
    const streams = new Set<grpc.ServerWritableStream<object, WatchRootsResponse>>()
    server.addService(connectCA().service, {
      WatchRoots: (call: grpc.ServerWritableStream<object, WatchRootsResponse>) => {
        agent.logRequest('gRPC', `/${CONNECT_CA_SERVICE}/WatchRoots`)
        try {
          agent.requireServiceWrite(tokenOf(call.metadata))
        } catch (err) {
          call.emit('error', statusError(err))
          return
        }
        streams.add(call)
        const send = (): void => { call.write(rootsMessage(agent.ca)) }
        const unsubscribe = agent.onRootsChange(send)
        const forget = (): void => {
          unsubscribe()
          streams.delete(call)
        }
        call.on('cancelled', forget)
        call.on('close', forget)
        send()
      },
      Sign: (call: grpc.ServerUnaryCall<SignRequest, SignResponse>, callback: grpc.sendUnaryData<SignResponse>) => {
        agent.logRequest('gRPC', `/${CONNECT_CA_SERVICE}/Sign`)
        sign(agent, opts.datacenter, call.request, tokenOf(call.metadata)).then(
          (certPem) => callback(null, { certPem }),
          (err: unknown) => callback(statusError(err)))
      }
    })
    /* c8 ignore next -- IPv6 hosts are bracketed; not exercised, as test machines may lack IPv6 */
    const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host
    const port = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`${host}:${opts.port}`, credentials, (err, bound) => {
        if (err !== null) reject(err)
        else resolve(bound)
      })
    })
    return new DevGrpcServer(server, streams, port, caPem)
  }

  /** Ends every WatchRoots stream and stops the server. */
  async close (): Promise<void> {
    for (const call of this.#streams) call.end()
    this.#streams.clear()
    await new Promise<void>((resolve) => this.#server.tryShutdown(() => resolve()))
  }
}

/** Consul's checks of a Sign request (agent/consul leader_connect_ca's AuthorizeAndSignCertificate), then the CA's signature. */
async function sign (agent: DevAgentServer, datacenter: string, request: SignRequest, token: string | undefined): Promise<string> {
  if (request.csr === '') throw invalid('CSR is required')
  let csr
  try {
    csr = parseCsr(request.csr)
  } catch (err) {
    throw invalid(`invalid CSR: ${(err as Error).message}`)
  }
  if (csr.uris.length !== 1) throw invalid(`CSR SAN contains ${csr.uris.length} URIs, expected exactly one`)
  const uri = csr.uris[0] as string
  const id = parseSpiffeId(uri)
  if (id === null || id.kind !== 'service') throw invalid(`SPIFFE ID is not a service identity: ${uri}`)
  if (id.trustDomain !== agent.ca.trustDomain) throw invalid(`SPIFFE ID in CSR from a different trust domain: ${id.trustDomain}`)
  if (id.datacenter !== datacenter) throw invalid(`SPIFFE ID in CSR from a different datacenter: ${id.datacenter}`)
  if (id.namespace !== 'default' || id.partition !== 'default') throw invalid('Namespaces and partitions are a Consul Enterprise feature')
  agent.requireServiceWrite(token, id.service)
  // The dev CA derives key IDs from EC points (Consul also signs RSA keys).
  if (createPublicKey({ key: csr.publicKeySpki, format: 'der', type: 'spki' }).asymmetricKeyType !== 'ec') throw invalid('the dev agent signs EC keys only')
  const signed = await agent.ca.signPublicKey(csr.publicKeySpki, uri)
  return signed.certPem
}

function tokenOf (metadata: grpc.Metadata): string | undefined {
  const value = metadata.get('x-consul-token')[0]
  return typeof value === 'string' && value !== '' ? value : undefined
}

class GrpcStatusError extends Error {
  readonly code: grpc.status
  constructor (code: grpc.status, message: string) {
    super(message)
    this.code = code
  }
}

function invalid (message: string): GrpcStatusError {
  return new GrpcStatusError(grpc.status.INVALID_ARGUMENT, message)
}

/** Consul's mapping: an unknown token is Unauthenticated, a missing privilege PermissionDenied. */
function statusError (err: unknown): Partial<grpc.StatusObject> & Error {
  const error = err as Error
  let code = grpc.status.INTERNAL
  if (err instanceof GrpcStatusError) code = err.code
  else if (err instanceof DevAgentHttpError) code = err.message === 'ACL not found' ? grpc.status.UNAUTHENTICATED : grpc.status.PERMISSION_DENIED
  return Object.assign(new Error(error.message), { code, details: error.message })
}

/** A CA's roots as one WatchRoots message, in Consul's field names. */
export function rootsMessage (ca: DevCertificateAuthority): WatchRootsResponse {
  return {
    activeRootId: ca.activeRootId(),
    trustDomain: ca.trustDomain,
    roots: ca.roots().map((root) => ({
      id: root.ID,
      name: root.Name,
      serialNumber: String(root.SerialNumber),
      signingKeyId: root.SigningKeyID,
      rootCert: root.RootCert,
      intermediateCerts: root.IntermediateCerts ?? [],
      active: root.Active,
      rotatedOutAt: null
    }))
  }
}
