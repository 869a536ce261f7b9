// PKCS#10 certificate signing requests (RFC 2986) for Consul's Sign RPC: an empty subject and
// one URI SAN, the SPIFFE ID, requested through the extensionRequest attribute. Built with the
// DER pieces @peculiar/asn1-x509 already serializes, plus a few hand-written TLVs for the
// request's own structure; parsed the same way by the dev agent.
import { createPublicKey, sign, verify } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { AsnConvert, OctetString } from '@peculiar/asn1-schema'
import * as asn from '@peculiar/asn1-x509'

const EXTENSION_REQUEST = '1.2.840.113549.1.9.14'
const SIGNATURE_HASH: Record<string, string> = {
  '1.2.840.10045.4.3.2': 'sha256', // ecdsa-with-SHA256
  '1.2.840.113549.1.1.11': 'sha256' // sha256WithRSAEncryption
}
const TAG = { integer: 0x02, bitString: 0x03, oid: 0x06, sequence: 0x30, set: 0x31, attributes: 0xa0 }

/** A PEM CSR for the URI SANs `uris` (Consul wants exactly one), signed with `privateKey` (EC P-256: ECDSA with SHA-256). */
export function createCsr (privateKey: KeyObject, uris: readonly string[]): string {
  const san = new asn.Extension({
    extnID: asn.id_ce_subjectAltName,
    // RFC 5280 §4.2.1.6: with an empty subject the SAN extension is critical.
    critical: true,
    extnValue: new OctetString(AsnConvert.serialize(new asn.SubjectAlternativeName(uris.map((uniformResourceIdentifier) => new asn.GeneralName({ uniformResourceIdentifier })))))
  })
  const extensionRequest = AsnConvert.serialize(new asn.Attribute({
    type: EXTENSION_REQUEST,
    values: [AsnConvert.serialize(new asn.Extensions([san]))]
  }))
  const info = tlv(TAG.sequence, Buffer.concat([
    tlv(TAG.integer, Buffer.of(0)),
    Buffer.from(AsnConvert.serialize(new asn.Name())),
    createPublicKey(privateKey).export({ type: 'spki', format: 'der' }),
    tlv(TAG.attributes, Buffer.from(extensionRequest))
  ]))
  const algorithm = Buffer.from(AsnConvert.serialize(new asn.AlgorithmIdentifier({ algorithm: '1.2.840.10045.4.3.2' })))
  const signature = sign('sha256', info, privateKey)
  const der = tlv(TAG.sequence, Buffer.concat([info, algorithm, tlv(TAG.bitString, Buffer.concat([Buffer.of(0), signature]))]))
  const lines = der.toString('base64').match(/.{1,64}/g) as string[]
  return `-----BEGIN CERTIFICATE REQUEST-----\n${lines.join('\n')}\n-----END CERTIFICATE REQUEST-----\n`
}

export interface ParsedCsr {
  /** DER SubjectPublicKeyInfo of the requested key. */
  publicKeySpki: Buffer
  /** The URI SANs requested, in order. */
  uris: string[]
}

/** Parses a PEM CSR and checks its signature; throws an Error saying what is wrong. */
export function parseCsr (pem: string): ParsedCsr {
  const match = /-----BEGIN CERTIFICATE REQUEST-----([\s\S]*?)-----END CERTIFICATE REQUEST-----/.exec(pem)
  if (match === null) throw new Error('no CERTIFICATE REQUEST PEM block')
  const der = Buffer.from((match[1] as string).replace(/\s+/g, ''), 'base64')
  const [info, algorithm, signature] = children(expect(der, 0, TAG.sequence, 'request'), 'request')
  if (info === undefined || algorithm === undefined || signature === undefined || signature.tag !== TAG.bitString) {
    throw new Error('request: expected info, algorithm and signature')
  }
  const [, , spki, ...rest] = children(info, 'request info')
  if (spki === undefined || spki.tag !== TAG.sequence) throw new Error('request info: no subject public key')
  const publicKeySpki = spki.raw
  const publicKey = createPublicKey({ key: publicKeySpki, format: 'der', type: 'spki' })
  const oid = AsnConvert.parse(algorithm.raw, asn.AlgorithmIdentifier).algorithm
  const hash = SIGNATURE_HASH[oid]
  if (hash === undefined) throw new Error(`unsupported signature algorithm ${oid}`)
  if (!verify(hash, info.raw, publicKey, signature.content.subarray(1))) throw new Error('the signature does not match the request')
  // The SAN extension of the extensionRequest attribute, if any; other attributes, extensions and name kinds are ignored.
  const uris = rest.filter((node) => node.tag === TAG.attributes)
    .flatMap((node) => children(node, 'attributes'))
    .map((attribute) => AsnConvert.parse(attribute.raw, asn.Attribute))
    .filter((attribute) => attribute.type === EXTENSION_REQUEST)
    .flatMap((attribute) => attribute.values.flatMap((value) => [...AsnConvert.parse(value, asn.Extensions)]))
    .filter((extension) => extension.extnID === asn.id_ce_subjectAltName)
    .flatMap((extension) => [...AsnConvert.parse(extension.extnValue.buffer, asn.SubjectAlternativeName)])
    .map((name) => name.uniformResourceIdentifier)
    .filter((uri): uri is string => uri !== undefined)
  return { publicKeySpki, uris }
}

interface Tlv { tag: number, content: Buffer, raw: Buffer }

function tlv (tag: number, content: Buffer): Buffer {
  const length = content.length
  let header: Buffer
  if (length < 0x80) header = Buffer.of(tag, length)
  else if (length < 0x100) header = Buffer.of(tag, 0x81, length)
  else header = Buffer.of(tag, 0x82, length >> 8, length & 0xff)
  return Buffer.concat([header, content])
}

function read (buf: Buffer, at: number, what: string): Tlv {
  const tag = buf[at]
  let length = buf[at + 1]
  if (tag === undefined || length === undefined) throw new Error(`${what}: truncated`)
  let start = at + 2
  if (length >= 0x80) {
    const bytes = length & 0x7f
    if (bytes < 1 || bytes > 3) throw new Error(`${what}: bad length`)
    if (start + bytes > buf.length) throw new Error(`${what}: truncated`)
    length = 0
    for (let i = 0; i < bytes; i++) length = length * 256 + (buf[start + i] as number)
    start += bytes
  }
  if (start + length > buf.length) throw new Error(`${what}: truncated`)
  return { tag, content: buf.subarray(start, start + length), raw: buf.subarray(at, start + length) }
}

function expect (buf: Buffer, at: number, tag: number, what: string): Tlv {
  const node = read(buf, at, what)
  if (node.tag !== tag || node.raw.length !== buf.length) throw new Error(`${what}: not a DER structure`)
  return node
}

function children (node: Tlv, what: string): Tlv[] {
  const out: Tlv[] = []
  let at = 0
  while (at < node.content.length) {
    const child = read(node.content, at, what)
    out.push(child)
    at += child.raw.length
  }
  return out
}
