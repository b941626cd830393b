package tech.byzer.llm.spark

import java.io.{ByteArrayInputStream, ByteArrayOutputStream, IOException}
import java.net.URI
import java.net.http.{HttpClient, HttpRequest, HttpResponse}
import java.nio.channels.Channels
import java.time.Duration
import java.util.concurrent.ThreadLocalRandom

import scala.jdk.CollectionConverters._

import com.fasterxml.jackson.databind.ObjectMapper
import org.apache.arrow.memory.{BufferAllocator, RootAllocator}
import org.apache.arrow.vector.{Float4Vector, VarCharVector, VectorSchemaRoot}
import org.apache.arrow.vector.complex.{ListVector, MapVector, StructVector}
import org.apache.arrow.vector.ipc.{ArrowStreamReader, ArrowStreamWriter}

import org.apache.spark.sql.catalyst.expressions.UnsafeArrayData
import org.apache.spark.sql.catalyst.util.{ArrayBasedMapData, ArrayData, GenericArrayData, MapData}
import org.apache.spark.unsafe.types.UTF8String

/** Where and how the bridge calls the models: read once on the driver (from the session's
 *  `spark.byzerllm.*` settings, else the environment), then shipped to the executors with the plan.
 *  The same defaults and policy as the Python client (`byzerllm_spark/transport.py`). */
final case class BridgeSettings(
    endpoint: String,
    authToken: Option[String],
    retrySeconds: Double,
    timeoutSeconds: Double) {
  // Plans are printed (EXPLAIN, the UI): never the token.
  override def toString: String =
    s"BridgeSettings($endpoint, authToken=${authToken.map(_ => "******").getOrElse("none")}, " +
      s"retrySeconds=$retrySeconds, timeoutSeconds=$timeoutSeconds)"
}

object BridgeSettings {
  val Endpoint = "spark.byzerllm.endpoint"
  val AuthToken = "spark.byzerllm.authToken"
  val RetrySeconds = "spark.byzerllm.retrySeconds"
  val Timeout = "spark.byzerllm.timeout"
  val BatchSize = "spark.byzerllm.batchSize"
  val Concurrency = "spark.byzerllm.concurrency"
  val EndpointEnv = "BYZERLLM_ENDPOINT"
  val AuthTokenEnv = "BYZERLLM_AUTH_TOKEN"
  val RetrySecondsEnv = "BYZERLLM_RETRY_SECONDS"
  /** As `settings.DEFAULT_RETRY_SECONDS`: outlasts a Serve proxy restart (23-30 s measured). */
  val DefaultRetrySeconds = 60.0

  /** `get` reads one setting (the session's conf); unset or empty is None. */
  def from(get: String => Option[String]): BridgeSettings = {
    def nonEmpty(o: Option[String]) = o.map(_.trim).filter(_.nonEmpty)
    val endpoint = nonEmpty(get(Endpoint)).orElse(nonEmpty(sys.env.get(EndpointEnv))).getOrElse(
      throw new IllegalArgumentException(
        s"the byzerllm bridge does not know where the models are: set $Endpoint (for example " +
          s"--conf $Endpoint=http://127.0.0.1:8000, the URL bls.endpoint() prints) or $$$EndpointEnv"))
    val retryRaw = nonEmpty(get(RetrySeconds)).map(RetrySeconds -> _)
      .orElse(nonEmpty(sys.env.get(RetrySecondsEnv)).map(RetrySecondsEnv -> _))
    val retry = retryRaw.map { case (name, raw) =>
      val v = scala.util.Try(raw.toDouble).getOrElse(-1.0)
      if (!(v >= 0 && !v.isInfinite)) throw new IllegalArgumentException(
        s"$name=$raw: pass seconds as a number >= 0 (default ${DefaultRetrySeconds.toInt}; 0 never retries)")
      v
    }.getOrElse(DefaultRetrySeconds)
    val timeout = nonEmpty(get(Timeout)).map(_.toDouble).getOrElse(600.0)
    BridgeSettings(endpoint.stripSuffix("/"), nonEmpty(get(AuthToken)).orElse(nonEmpty(sys.env.get(AuthTokenEnv))),
      retry, timeout)
  }
}

/** An error of the whole request (not of one row): refused, not deployed, or the retry budget spent. */
class BridgeRequestException(message: String) extends RuntimeException(message)

/** The one HTTP client of the JVM side: keep-alive HTTP/1.1 (the JDK's client), bearer token, retries of
 *  connection errors and 5xx with bounded exponential backoff and jitter inside a time budget counted from
 *  the first failure; a 4xx is never retried (the same body would fail again). */
object Transport {
  private val BackoffS = 0.2
  private val MaxBackoffS = 4.0
  private val RetryStatus = Set(500, 502, 503, 504)

  lazy val client: HttpClient = HttpClient.newBuilder()
    .version(HttpClient.Version.HTTP_1_1)
    .connectTimeout(Duration.ofSeconds(10))
    .build()

  private def request(s: BridgeSettings, url: String): HttpRequest.Builder = {
    val b = HttpRequest.newBuilder(URI.create(url)).timeout(Duration.ofMillis((s.timeoutSeconds * 1000).toLong))
    s.authToken.foreach(t => b.header("Authorization", s"Bearer $t"))
    b
  }

  /** POST an Arrow body to `{endpoint}/{model}/{route}`; the answer's bytes. */
  def postArrow(s: BridgeSettings, model: String, body: Array[Byte], route: String = "arrow"): Array[Byte] = {
    val url = s"${s.endpoint}/$model/$route"
    val req = request(s, url).header("Content-Type", ArrowCodec.ContentType)
      .POST(HttpRequest.BodyPublishers.ofByteArray(body)).build()
    send(s, model, url, req)
  }

  def getJson(s: BridgeSettings, model: String, route: String): java.util.Map[String, AnyRef] = {
    val url = s"${s.endpoint}/$model/$route"
    val bytes = send(s, model, url, request(s, url).GET().build())
    ArrowCodec.json.readValue(bytes, classOf[java.util.Map[String, AnyRef]])
  }

  private def send(s: BridgeSettings, model: String, url: String, req: HttpRequest): Array[Byte] = {
    var firstFailure = -1L
    var tries = 0
    var lastReason = ""
    while (true) {
      val answer: Either[String, HttpResponse[Array[Byte]]] =
        try Right(client.send(req, HttpResponse.BodyHandlers.ofByteArray()))
        catch {
          case e: IOException => Left(s"${e.getClass.getSimpleName}: ${e.getMessage}")
          case e: InterruptedException => throw e
        }
      answer match {
        case Right(resp) if resp.statusCode == 200 => return resp.body
        case Right(resp) if !RetryStatus.contains(resp.statusCode) => throw refused(s, model, url, resp)
        case Right(resp) => lastReason = s"HTTP ${resp.statusCode}: ${text(resp.body)}"
        case Left(reason) => lastReason = reason
      }
      val now = System.nanoTime()
      if (firstFailure < 0) firstFailure = now
      val elapsed = (now - firstFailure) / 1e9
      if (elapsed >= s.retrySeconds) {
        throw new BridgeRequestException(
          s"$url failed after $tries retries in ${elapsed.round} s: $lastReason. The retry budget was " +
            s"${BridgeSettings.RetrySeconds}=${s.retrySeconds}; raise it (or $$${BridgeSettings.RetrySecondsEnv}) " +
            "when the cluster needs longer to come back")
      }
      val wait = math.min(math.min(MaxBackoffS, BackoffS * math.pow(2, tries)) +
        ThreadLocalRandom.current().nextDouble() * BackoffS, s.retrySeconds - elapsed)
      tries += 1
      Thread.sleep(math.max(0L, (wait * 1000).toLong))
    }
    throw new IllegalStateException("unreachable")
  }

  private def text(body: Array[Byte]): String = {
    val t = new String(body, java.nio.charset.StandardCharsets.UTF_8)
    if (t.length > 500) t.substring(0, 500) else t
  }

  private def refused(s: BridgeSettings, model: String, url: String, resp: HttpResponse[Array[Byte]]) = {
    resp.statusCode match {
      case 401 => new BridgeRequestException(
        s"$url answered 401: the endpoint needs its bearer token; set ${BridgeSettings.AuthToken} " +
          s"(--conf ${BridgeSettings.AuthToken}=...) or $$${BridgeSettings.AuthTokenEnv}")
      case 404 if !deployedModels(s).contains(model) => notDeployed(s, model)
      case code => new BridgeRequestException(s"$url failed: HTTP $code: ${text(resp.body)}")
    }
  }

  def notDeployed(s: BridgeSettings, model: String): BridgeRequestException = {
    val deployed = deployedModels(s)
    new BridgeRequestException(
      s"model '$model' is not deployed at ${s.endpoint}; deployed: " +
        s"${if (deployed.isEmpty) "none" else deployed.mkString(", ")}. Deploy it (bls.deploy) and run " +
        "SELECT byzerllm_refresh()")
  }

  /** Model names served at the endpoint (Serve's `/-/routes`, less the OpenAI app at `/v1`). */
  def deployedModels(s: BridgeSettings): Seq[String] = {
    val url = s"${s.endpoint}/-/routes"
    val resp = client.send(request(s, url).GET().build(), HttpResponse.BodyHandlers.ofByteArray())
    if (resp.statusCode == 401) throw refused(s, "", url, resp)
    if (resp.statusCode != 200) return Nil
    val routes = ArrowCodec.json.readValue(resp.body, classOf[java.util.Map[String, String]]).asScala
    routes.keys.map(_.stripPrefix("/").stripSuffix("/")).filter(p => p.nonEmpty && p != "v1" && !p.contains("/"))
      .toSeq.sorted
  }
}

/** The Arrow wire format of `POST {endpoint}/{model}/arrow` (see `byzerllm_spark/protocol/arrow.py`):
 *  request column `params` (string, null allowed); answer columns `response`, `error` (string) and
 *  `metadata` (map<string,string>), as many rows in the same order. */
object ArrowCodec {
  val ContentType = "application/vnd.apache.arrow.stream"
  lazy val json = new ObjectMapper()
  lazy val allocator: BufferAllocator = new RootAllocator(Long.MaxValue)

  final class Answers(val response: Array[UTF8String], val error: Array[UTF8String], val metadata: Array[MapData])

  /** Rows as UTF-8 bytes (null for a null row). */
  def encode(params: Array[Array[Byte]], n: Int): Array[Byte] = {
    val alloc = allocator.newChildAllocator("byzerllm-encode", 0, Long.MaxValue)
    try {
      val vector = new VarCharVector("params", alloc)
      val root = VectorSchemaRoot.of(vector)
      try {
        vector.allocateNew(params.iterator.take(n).map(p => if (p == null) 0L else p.length.toLong).sum.max(1L), n)
        var i = 0
        while (i < n) {
          val p = params(i)
          if (p == null) vector.setNull(i) else vector.setSafe(i, p, 0, p.length)
          i += 1
        }
        vector.setValueCount(n)
        root.setRowCount(n)
        val out = new ByteArrayOutputStream()
        val writer = new ArrowStreamWriter(root, null, Channels.newChannel(out))
        writer.start(); writer.writeBatch(); writer.end(); writer.close()
        out.toByteArray
      } finally root.close()
    } finally alloc.close()
  }

  /** Reads an Arrow answer of `expected` rows: `each(root, firstRow, rows)` for each record batch, where
   *  `firstRow` is the batch's offset in the answer. An answer of more or fewer rows is the endpoint's error. */
  private def readRows(body: Array[Byte], expected: Int, name: String)(
      each: (VectorSchemaRoot, Int, Int) => Unit): Unit = {
    val alloc = allocator.newChildAllocator(name, 0, Long.MaxValue)
    try {
      val reader = new ArrowStreamReader(new ByteArrayInputStream(body), alloc)
      try {
        val root = reader.getVectorSchemaRoot
        var row = 0
        while (reader.loadNextBatch()) {
          val n = root.getRowCount
          if (row + n > expected) throw new BridgeRequestException(
            s"the endpoint answered more rows than the $expected sent")
          each(root, row, n)
          row += n
        }
        if (row != expected) throw new BridgeRequestException(
          s"the endpoint answered $row rows for the $expected sent")
      } finally reader.close()
    } finally alloc.close()
  }

  /** `withMetadata = false` leaves `metadata` null: the text form of a model function does not return it,
   *  and a map a row is most of the decoding's cost. */
  def decode(body: Array[Byte], expected: Int, withMetadata: Boolean = true): Answers = {
    val response = new Array[UTF8String](expected)
    val error = new Array[UTF8String](expected)
    val metadata = new Array[MapData](expected)
    readRows(body, expected, "byzerllm-decode") { (root, row, n) =>
      val r = root.getVector("response").asInstanceOf[VarCharVector]
      val e = root.getVector("error").asInstanceOf[VarCharVector]
      val m = root.getVector("metadata").asInstanceOf[MapVector]
      val entries = m.getDataVector.asInstanceOf[StructVector]
      val keys = entries.getChildByOrdinal(0).asInstanceOf[VarCharVector]
      val values = entries.getChildByOrdinal(1).asInstanceOf[VarCharVector]
      var i = 0
      while (i < n) {
        if (!r.isNull(i)) response(row + i) = UTF8String.fromBytes(r.get(i))
        if (!e.isNull(i)) error(row + i) = UTF8String.fromBytes(e.get(i))
        if (withMetadata && !m.isNull(i)) {
          val start = m.getElementStartIndex(i)
          val end = m.getElementEndIndex(i)
          val ks = new Array[Any](end - start)
          val vs = new Array[Any](end - start)
          var j = start
          while (j < end) {
            ks(j - start) = UTF8String.fromBytes(keys.get(j))
            vs(j - start) = if (values.isNull(j)) null else UTF8String.fromBytes(values.get(j))
            j += 1
          }
          metadata(row + i) = new ArrayBasedMapData(new GenericArrayData(ks), new GenericArrayData(vs))
        }
        i += 1
      }
    }
    new Answers(response, error, metadata)
  }

  /** The answer of `POST {endpoint}/{model}/embed` (columns `embedding` list<float32>, `error` string):
   *  each row's vector (null where the row was null or not embedded) and error text. */
  def decodeEmbeddings(body: Array[Byte], expected: Int): (Array[ArrayData], Array[String]) = {
    val vectors = new Array[ArrayData](expected)
    val errors = new Array[String](expected)
    readRows(body, expected, "byzerllm-decode-embed") { (root, row, n) =>
      val list = root.getVector("embedding").asInstanceOf[ListVector]
      val values = list.getDataVector.asInstanceOf[Float4Vector]
      val e = root.getVector("error").asInstanceOf[VarCharVector]
      var i = 0
      while (i < n) {
        if (!list.isNull(i)) {
          val start = list.getElementStartIndex(i)
          val floats = new Array[Float](list.getElementEndIndex(i) - start)
          var j = 0
          while (j < floats.length) { floats(j) = values.get(start + j); j += 1 }
          vectors(row + i) = UnsafeArrayData.fromPrimitiveArray(floats)
        }
        if (!e.isNull(i)) errors(row + i) = new String(e.get(i), java.nio.charset.StandardCharsets.UTF_8)
        i += 1
      }
    }
    (vectors, errors)
  }

  /** A row that is plain text, not a JSON object, is sent as `{"instruction": text}` (as the Python side). */
  def asRequestJson(utf8: Array[Byte]): Array[Byte] = {
    var i = 0
    while (i < utf8.length && Character.isWhitespace(utf8(i).toChar)) i += 1
    if (i < utf8.length && utf8(i) == '{'.toByte) utf8
    else json.writeValueAsBytes(java.util.Map.of("instruction", new String(utf8, java.nio.charset.StandardCharsets.UTF_8)))
  }
}
