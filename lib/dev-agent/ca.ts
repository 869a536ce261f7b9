// The dev agent's certificate authority: a real EC P-256 CA that issues certificates shaped like
// those of Consul's built-in provider (docs/semantics.md#dev-agent-certificates), so the plugin's TLS code is
// exercised against the same chains, extensions and rotation behaviour as against a real agent.
// Certificates are assembled with @peculiar/asn1-x509 and signed with node:crypto rather than
// built with @peculiar/x509: the latter needs a global Reflect-metadata polyfill (tsyringe) that
// this package does not ship, and a library should not patch globals.
import { createHash, createPrivateKey, createPublicKey, generateKeyPair, randomInt, randomUUID, sign } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { promisify } from 'node:util'
import { AsnConvert, OctetString } from '@peculiar/asn1-schema'
import * as asn from '@peculiar/asn1-x509'
import type { CARoot } from '../agent/wire'
import { serviceSpiffeId } from '../spiffe'

const generateKeyPairAsync = promisify(generateKeyPair)

const MINUTE_MS = 60_000
const DAY_MS = 24 * 60 * MINUTE_MS
const DEFAULT_LEAF_TTL_MS = 72 * 60 * MINUTE_MS
const ROOT_VALIDITY_YEARS = 10
// Consul's cross-signed root is valid for 7 days from one minute before rotation (test/fixtures/consul/ca-roots-after-rotation.json).
const CROSS_SIGNED_VALIDITY_MS = 7 * DAY_MS
/**
 * Roots kept after a rotation: the active one and the two most recently rotated out. Consul prunes
 * a rotated-out root 2 × LeafCertTTL after rotation on a timer; the dev agent has no timer, and a
 * count bound keeps `roots()` small while leaves of the previous two roots still verify.
 */
const MAX_RETAINED_ROOTS = 3
const ECDSA_WITH_SHA256 = '1.2.840.10045.4.3.2'
const COMMON_NAME = '2.5.4.3'
const PRINTABLE = /^[A-Za-z0-9 '()+,\-./:=?]*$/
const EXTENDED_KEY_USAGES = { serverAuth: asn.id_kp_serverAuth, clientAuth: asn.id_kp_clientAuth }

const ROOT_KEY_USAGE = asn.KeyUsageFlags.keyCertSign | asn.KeyUsageFlags.cRLSign | asn.KeyUsageFlags.digitalSignature
const LEAF_KEY_USAGE = asn.KeyUsageFlags.digitalSignature | asn.KeyUsageFlags.keyEncipherment |
  asn.KeyUsageFlags.dataEncipherment | asn.KeyUsageFlags.keyAgreement

/** A certificate issued for a service, as the leaf endpoint returns it. */
export interface SignedLeaf {
  /** Leaf PEM followed by the active root's `IntermediateCerts`, each newline-terminated (Consul's `CertPEM`). */
  certPem: string
  /** SEC1 (`EC PRIVATE KEY`) PEM of the leaf's P-256 key. */
  privateKeyPem: string
  /** Colon-separated lowercase hex of the serial's big-endian bytes, e.g. `08`, `1d:4f`. */
  serialNumber: string
  /** The certificate's only URI SAN. */
  uri: string
  validAfter: Date
  validBefore: Date
}

export interface CertificateAuthorityOptions {
  /** UUID of the cluster; the trust domain is `<clusterId>.consul`. Random by default. */
  clusterId?: string
  /** Datacenter written into leaf URIs when `signLeaf` is not given one. Default `dc1`. */
  datacenter?: string
  /** Leaf validity (Consul's `LeafCertTTL`). Default 72 hours. */
  leafTTLms?: number
  /** PEM (SEC1 or PKCS#8) EC P-256 key for the first root; generated when absent. */
  privateKeyPem?: string
  /** Raft-style index stored as the first root's `CreateIndex`/`ModifyIndex`. Default 1. */
  index?: number
}

export interface RotateOptions {
  /** PEM (SEC1 or PKCS#8) EC P-256 key for the new root; generated when absent. */
  privateKeyPem?: string
  /**
   * Index of the rotation: the new root's `CreateIndex`/`ModifyIndex` and the old active root's
   * new `ModifyIndex`. Default: one more than the highest `ModifyIndex` among the roots.
   */
  index?: number
}

export interface SignLeafOptions {
  datacenter?: string
  namespace?: string
  partition?: string
}

export interface IssueCertificateOptions {
  uris?: string[]
  dnsNames?: string[]
  /** Default: one minute ago, as for leaves. */
  notBefore?: Date
  /** Default: `notBefore + leafTTLms`. */
  notAfter?: Date
  /** Default both; an empty list omits the extension. */
  extKeyUsage?: Array<'serverAuth' | 'clientAuth'>
  /** Subject CN; the subject is empty when absent, as for Consul's leaves. */
  commonName?: string
  /** basicConstraints CA:TRUE, which Consul never sets on a leaf. Default false. */
  ca?: boolean
}

interface IssueParams {
  /** DER SubjectPublicKeyInfo of a key the requester holds (a CSR); a new key is generated when absent. */
  publicKeySpki?: Buffer
  uris: string[]
  dnsNames: string[]
  notBefore: Date
  notAfter: Date
  extKeyUsage: Array<'serverAuth' | 'clientAuth'>
  commonName?: string | undefined
  ca?: boolean
}

interface SigningKey {
  privateKey: KeyObject
  /** DER SubjectPublicKeyInfo. */
  publicKeySpki: Buffer
  /** 32-byte key id (SHA-256 of the EC point), used as SKID/AKID and `SigningKeyID`. */
  keyId: Buffer
}

interface RootRecord {
  key: SigningKey
  subject: asn.Name
  notBefore: Date
  notAfter: Date
  pem: string
  id: string
  serialNumber: number
  intermediateCerts: string[] | null
  active: boolean
  createIndex: number
  modifyIndex: number
}

/**
 * An in-memory Consul-style CA. Roots, serial numbers and indexes live in the instance; the HTTP
 * server owns the Raft-like index counter and passes it in through `create({ index })` and
 * `rotate({ index })`, which become `CreateIndex`/`ModifyIndex` in `roots()`.
 */
export class DevCertificateAuthority {
  readonly clusterId: string
  readonly trustDomain: string
  readonly datacenter: string
  #leafTTLms: number
  #roots: RootRecord[] = []
  // Consul draws root, cross-signed and leaf serials from one per-cluster counter.
  #nextSerial = 1
  #rotation: Promise<void> = Promise.resolve()

  private constructor (clusterId: string, datacenter: string, leafTTLms: number) {
    this.clusterId = clusterId
    this.trustDomain = `${clusterId}.consul`.toLowerCase()
    this.datacenter = datacenter
    this.#leafTTLms = validTTL(leafTTLms)
  }

  static async create (opts: CertificateAuthorityOptions = {}): Promise<DevCertificateAuthority> {
    const ca = new DevCertificateAuthority(
      opts.clusterId ?? randomUUID(), opts.datacenter ?? 'dc1', opts.leafTTLms ?? DEFAULT_LEAF_TTL_MS)
    const key = await signingKey(opts.privateKeyPem)
    const index = opts.index ?? 1
    ca.#roots = [ca.#newRoot(key, null, index)]
    return ca
  }

  /** Validity of leaves signed from now on (Consul's CA configuration `LeafCertTTL`). */
  get leafTTLms (): number {
    return this.#leafTTLms
  }

  set leafTTLms (ms: number) {
    this.#leafTTLms = validTTL(ms)
  }

  /** The roots in Consul's order: the active (newest) root first, then older ones, newest first. */
  roots (): CARoot[] {
    return this.#roots.map((root) => ({
      ID: root.id,
      Name: 'Consul CA Primary Cert',
      SerialNumber: root.serialNumber,
      SigningKeyID: colonHex(root.key.keyId),
      // Consul 1.10 fills this with the cluster id even for current roots (test/fixtures/consul/ca-roots.json).
      ExternalTrustDomain: this.clusterId,
      NotBefore: rfc3339(root.notBefore),
      NotAfter: rfc3339(root.notAfter),
      RootCert: root.pem,
      IntermediateCerts: root.intermediateCerts === null ? null : [...root.intermediateCerts],
      Active: root.active,
      PrivateKeyType: 'ec',
      PrivateKeyBits: 256,
      CreateIndex: root.createIndex,
      ModifyIndex: root.modifyIndex
    }))
  }

  activeRootId (): string {
    return this.#active().id
  }

  /** Signs a service leaf exactly as Consul's built-in provider does (docs/semantics.md#dev-agent-certificates). */
  async signLeaf (service: string, opts: SignLeafOptions = {}): Promise<SignedLeaf> {
    const uri = serviceSpiffeId(this.trustDomain, {
      partition: opts.partition,
      namespace: opts.namespace,
      datacenter: opts.datacenter ?? this.datacenter,
      service
    })
    const validAfter = wholeSeconds(Date.now() - MINUTE_MS)
    const validBefore = new Date(validAfter.getTime() + this.#leafTTLms)
    const issued = await this.#issue({
      uris: [uri],
      dnsNames: [],
      notBefore: validAfter,
      notAfter: validBefore,
      extKeyUsage: ['clientAuth', 'serverAuth']
    })
    return { ...issued, uri, validAfter, validBefore }
  }

  /**
   * Signs a leaf for a key the requester holds, as Consul's Sign RPC does for a CSR: `uri` is the
   * CSR's SPIFFE ID, already authorized by the caller. No private key is returned.
   */
  async signPublicKey (publicKeySpki: Buffer, uri: string): Promise<Omit<SignedLeaf, 'privateKeyPem'>> {
    const validAfter = wholeSeconds(Date.now() - MINUTE_MS)
    const validBefore = new Date(validAfter.getTime() + this.#leafTTLms)
    const { certPem, serialNumber } = await this.#issue({
      publicKeySpki,
      uris: [uri],
      dnsNames: [],
      notBefore: validAfter,
      notAfter: validBefore,
      extKeyUsage: ['clientAuth', 'serverAuth']
    })
    return { certPem, serialNumber, uri, validAfter, validBefore }
  }

  /**
   * Replaces the active root the way Consul does when the CA configuration gets a new key: the old
   * root's key cross-signs the new root, that certificate becomes the first `IntermediateCerts`
   * entry of the new root (so new leaves chain to either root), and the old root stays listed as
   * inactive. At most three roots are kept (see MAX_RETAINED_ROOTS). Rotations run one at a time,
   * in call order; a failed one changes nothing.
   */
  async rotate (opts: RotateOptions = {}): Promise<void> {
    const run = this.#rotation.then(async () => await this.#rotateNow(opts))
    // A failed rotation must not block later ones.
    this.#rotation = run.catch(() => undefined)
    await run
  }

  /**
   * Issues an arbitrary certificate from the active root key, for tests of certificates Consul
   * would not issue (other trust domains, agent IDs, expired, several or no URIs).
   */
  async issueCertificate (opts: IssueCertificateOptions): Promise<{ certPem: string, privateKeyPem: string }> {
    const notBefore = opts.notBefore ?? wholeSeconds(Date.now() - MINUTE_MS)
    const { certPem, privateKeyPem } = await this.#issue({
      uris: opts.uris ?? [],
      dnsNames: opts.dnsNames ?? [],
      notBefore,
      notAfter: opts.notAfter ?? new Date(notBefore.getTime() + this.#leafTTLms),
      extKeyUsage: opts.extKeyUsage ?? ['clientAuth', 'serverAuth'],
      commonName: opts.commonName,
      ca: opts.ca === true
    })
    return { certPem, privateKeyPem }
  }

  #active (): RootRecord {
    // #roots is never empty once create() has returned, and the active root is always first.
    return this.#roots[0] as RootRecord
  }

  #takeSerial (): number {
    return this.#nextSerial++
  }

  async #rotateNow (opts: RotateOptions): Promise<void> {
    const key = await signingKey(opts.privateKeyPem)
    const old = this.#active()
    const index = opts.index ?? Math.max(...this.#roots.map((root) => root.modifyIndex)) + 1
    const root = this.#newRoot(key, old, index)
    old.active = false
    old.modifyIndex = index
    this.#roots = [root, ...this.#roots].slice(0, MAX_RETAINED_ROOTS)
  }

  #newRoot (key: SigningKey, previous: RootRecord | null, index: number): RootRecord {
    const subject = commonName(`pri-${randomBase36(8)}.consul.ca.${this.clusterId.slice(0, 8)}.consul`)
    const notBefore = wholeSeconds(Date.now())
    const notAfter = new Date(notBefore)
    notAfter.setUTCFullYear(notAfter.getUTCFullYear() + ROOT_VALIDITY_YEARS)
    const serialNumber = this.#takeSerial()
    const der = signCertificate({
      serialNumber,
      subject,
      issuer: subject,
      notBefore,
      notAfter,
      publicKeySpki: key.publicKeySpki,
      signingKey: key.privateKey,
      extensions: this.#caExtensions(key.keyId, key.keyId)
    })
    let intermediateCerts: string[] | null = null
    if (previous !== null) {
      const crossNotBefore = wholeSeconds(Date.now() - MINUTE_MS)
      intermediateCerts = [pem(signCertificate({
        serialNumber: this.#takeSerial(),
        subject,
        issuer: previous.subject,
        notBefore: crossNotBefore,
        notAfter: new Date(crossNotBefore.getTime() + CROSS_SIGNED_VALIDITY_MS),
        publicKeySpki: key.publicKeySpki,
        signingKey: previous.key.privateKey,
        extensions: this.#caExtensions(key.keyId, previous.key.keyId)
      }))]
    }
    return {
      key,
      subject,
      notBefore,
      notAfter,
      pem: pem(der),
      id: colonHex(createHash('sha1').update(der).digest()),
      serialNumber,
      intermediateCerts,
      active: true,
      createIndex: index,
      modifyIndex: index
    }
  }

  #caExtensions (subjectKeyId: Buffer, authorityKeyId: Buffer): asn.Extension[] {
    return [
      extension(asn.id_ce_keyUsage, true, new asn.KeyUsage(ROOT_KEY_USAGE)),
      extension(asn.id_ce_basicConstraints, true, new asn.BasicConstraints({ cA: true })),
      extension(asn.id_ce_subjectKeyIdentifier, false, new asn.SubjectKeyIdentifier(subjectKeyId)),
      extension(asn.id_ce_authorityKeyIdentifier, false, authorityKeyIdentifier(authorityKeyId)),
      extension(asn.id_ce_subjectAltName, false, new asn.SubjectAlternativeName([
        new asn.GeneralName({ uniformResourceIdentifier: `spiffe://${this.trustDomain}` })
      ]))
    ]
  }

  async #issue (opts: IssueParams): Promise<{ certPem: string, privateKeyPem: string, serialNumber: string }> {
    const root = this.#active()
    const { privateKey, publicKey } = opts.publicKeySpki === undefined
      ? await generateKeyPairAsync('ec', { namedCurve: 'prime256v1' })
      : { privateKey: null, publicKey: createPublicKey({ key: opts.publicKeySpki, format: 'der', type: 'spki' }) }
    const serialNumber = this.#takeSerial()
    const names = [
      ...opts.dnsNames.map((dNSName) => new asn.GeneralName({ dNSName })),
      ...opts.uris.map((uniformResourceIdentifier) => new asn.GeneralName({ uniformResourceIdentifier }))
    ]
    const extensions = [
      extension(asn.id_ce_keyUsage, true, new asn.KeyUsage(LEAF_KEY_USAGE)),
      ...opts.extKeyUsage.length > 0
        ? [extension(asn.id_ce_extKeyUsage, false, new asn.ExtendedKeyUsage(opts.extKeyUsage.map((usage) => EXTENDED_KEY_USAGES[usage])))]
        : [],
      extension(asn.id_ce_basicConstraints, true, new asn.BasicConstraints({ cA: opts.ca === true })),
      extension(asn.id_ce_subjectKeyIdentifier, false, new asn.SubjectKeyIdentifier(keyIdOf(publicKey))),
      extension(asn.id_ce_authorityKeyIdentifier, false, authorityKeyIdentifier(root.key.keyId)),
      // RFC 5280 §4.2.1.6: with an empty subject the SAN extension must be critical.
      ...names.length > 0 ? [extension(asn.id_ce_subjectAltName, opts.commonName === undefined, new asn.SubjectAlternativeName(names))] : []
    ]
    const der = signCertificate({
      serialNumber,
      subject: opts.commonName === undefined ? new asn.Name() : commonName(opts.commonName),
      issuer: root.subject,
      notBefore: opts.notBefore,
      notAfter: opts.notAfter,
      publicKeySpki: publicKey.export({ type: 'spki', format: 'der' }),
      signingKey: root.key.privateKey,
      extensions
    })
    return {
      certPem: pem(der) + (root.intermediateCerts ?? []).join(''),
      privateKeyPem: privateKey === null ? '' : privateKey.export({ type: 'sec1', format: 'pem' }) as string,
      serialNumber: colonHex(serialBytes(serialNumber))
    }
  }
}

interface CertificateTemplate {
  serialNumber: number
  subject: asn.Name
  issuer: asn.Name
  notBefore: Date
  notAfter: Date
  /** DER SubjectPublicKeyInfo of the certified key. */
  publicKeySpki: Buffer
  signingKey: KeyObject
  extensions: asn.Extension[]
}

/** DER of an X.509 v3 certificate signed with ECDSA-SHA256. */
function signCertificate (template: CertificateTemplate): Buffer {
  const signatureAlgorithm = new asn.AlgorithmIdentifier({ algorithm: ECDSA_WITH_SHA256 })
  const tbsCertificate = new asn.TBSCertificate({
    version: asn.Version.v3,
    serialNumber: toArrayBuffer(derInteger(serialBytes(template.serialNumber))),
    signature: signatureAlgorithm,
    issuer: template.issuer,
    validity: new asn.Validity({ notBefore: template.notBefore, notAfter: template.notAfter }),
    subject: template.subject,
    subjectPublicKeyInfo: AsnConvert.parse(template.publicKeySpki, asn.SubjectPublicKeyInfo),
    extensions: new asn.Extensions(template.extensions)
  })
  // node:crypto signs EC keys with a DER-encoded ECDSA signature, the form X.509 carries.
  const signatureValue = sign('sha256', Buffer.from(AsnConvert.serialize(tbsCertificate)), template.signingKey)
  return Buffer.from(AsnConvert.serialize(new asn.Certificate({
    tbsCertificate,
    signatureAlgorithm,
    signatureValue: toArrayBuffer(signatureValue)
  })))
}

function extension (extnID: string, critical: boolean, value: object): asn.Extension {
  return new asn.Extension({ extnID, critical, extnValue: new OctetString(AsnConvert.serialize(value)) })
}

function authorityKeyIdentifier (keyId: Buffer): asn.AuthorityKeyIdentifier {
  return new asn.AuthorityKeyIdentifier({ keyIdentifier: new asn.KeyIdentifier(keyId) })
}

function commonName (value: string): asn.Name {
  return new asn.Name([new asn.RelativeDistinguishedName([
    new asn.AttributeTypeAndValue({
      type: COMMON_NAME,
      // PrintableString when possible, like Go's encoder (Consul's root names are printable).
      value: new asn.AttributeValue(PRINTABLE.test(value) ? { printableString: value } : { utf8String: value })
    })
  ])])
}

async function signingKey (privateKeyPem: string | undefined): Promise<SigningKey> {
  let privateKey: KeyObject
  if (privateKeyPem === undefined) {
    privateKey = (await generateKeyPairAsync('ec', { namedCurve: 'prime256v1' })).privateKey
  } else {
    privateKey = createPrivateKey(privateKeyPem)
    if (privateKey.asymmetricKeyType !== 'ec' || privateKey.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
      throw new TypeError('CA private key must be an EC P-256 key')
    }
  }
  const publicKey = createPublicKey(privateKey)
  return { privateKey, publicKeySpki: publicKey.export({ type: 'spki', format: 'der' }), keyId: keyIdOf(publicKey) }
}

function keyIdOf (publicKey: KeyObject): Buffer {
  const jwk = publicKey.export({ format: 'jwk' })
  const point = Buffer.concat([Buffer.of(4), Buffer.from(jwk.x as string, 'base64url'), Buffer.from(jwk.y as string, 'base64url')])
  return createHash('sha256').update(point).digest()
}

function validTTL (ms: number): number {
  if (!Number.isFinite(ms) || ms <= 0) {
    throw new RangeError(`leafTTLms must be a positive number of milliseconds, got ${ms}`)
  }
  return ms
}

/** Minimal big-endian bytes of a positive serial. */
function serialBytes (serial: number): Buffer {
  const hex = serial.toString(16)
  return Buffer.from(hex.length % 2 === 0 ? hex : `0${hex}`, 'hex')
}

/** DER INTEGER content of a positive number: a leading zero byte keeps the sign bit clear. */
function derInteger (magnitude: Buffer): Buffer {
  return (magnitude[0] as number) >= 0x80 ? Buffer.concat([Buffer.of(0), magnitude]) : magnitude
}

function toArrayBuffer (bytes: Buffer): ArrayBuffer {
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer
}

function colonHex (bytes: Buffer): string {
  return bytes.toString('hex').replace(/(..)(?!$)/g, '$1:')
}

function pem (der: Buffer): string {
  const lines = der.toString('base64').match(/.{1,64}/g) as string[]
  return `-----BEGIN CERTIFICATE-----\n${lines.join('\n')}\n-----END CERTIFICATE-----\n`
}

/** Certificates carry whole seconds; truncating keeps the returned dates equal to the encoded ones. */
function wholeSeconds (ms: number): Date {
  return new Date(Math.floor(ms / 1000) * 1000)
}

function rfc3339 (date: Date): string {
  return date.toISOString().replace('.000Z', 'Z')
}

function randomBase36 (length: number): string {
  const alphabet = '0123456789abcdefghijklmnopqrstuvwxyz'
  let out = ''
  for (let i = 0; i < length; i++) out += alphabet[randomInt(alphabet.length)]
  return out
}
