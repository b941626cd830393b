package tech.byzer.llm.spark

import java.util.concurrent.{ExecutorService, Executors, Future, ThreadFactory}
import java.util.concurrent.atomic.AtomicInteger

import scala.collection.mutable

import org.apache.spark.{SparkException, TaskContext}
import org.apache.spark.rdd.RDD
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions._
import org.apache.spark.sql.catalyst.plans.logical.{LogicalPlan, Project, UnaryNode}
import org.apache.spark.sql.catalyst.rules.Rule
import org.apache.spark.sql.execution.{SparkPlan, SparkStrategy, UnaryExecNode}
import org.apache.spark.sql.types._
import org.apache.spark.unsafe.types.UTF8String

object Types {
  val Metadata: DataType = MapType(StringType, StringType, valueContainsNull = true)
  /** `fail_on_error=false`: the same struct as the Python side's `RESULT_TYPE_DDL`. */
  val Result: StructType = StructType(Seq(
    StructField("response", StringType), StructField("error", StringType), StructField("metadata", Metadata)))
  /** An embedding model's answer: the Python side's `EMBEDDING_TYPE_DDL`, `array<float>`. */
  val Embedding: DataType = ArrayType(FloatType, containsNull = true)
}

/** A call of a deployed model on one row's request JSON (or text). It is never evaluated row by row: the
 *  optimizer rule [[ExtractLLMCalls]] moves it into a [[BatchLLM]] node, which runs it over Arrow batches
 *  (as Spark's `ExtractPythonUDFs` moves Python UDFs into `ArrowEvalPythonExec`). `embedding`: the model
 *  computes embeddings (its info says so): the rows go to `POST {endpoint}/{model}/embed` and the answer is
 *  `array<float>` (a row the model could not embed is null with `fail_on_error` false). */
case class LLMCall(model: String, params: Expression, failOnError: Boolean, embedding: Boolean = false)
    extends UnaryExpression with Unevaluable with NonSQLExpression {
  override def child: Expression = params
  override def dataType: DataType =
    if (embedding) Types.Embedding else if (failOnError) StringType else Types.Result
  override def nullable: Boolean = true
  override def prettyName: String = model
  override def toString: String = s"$model($params${if (failOnError) "" else ", fail_on_error=false"})"
  override protected def withNewChildInternal(newChild: Expression): LLMCall = copy(params = newChild)
}

/** The calls of a node, evaluated over the child's rows; output: the child's columns, then one per call. */
case class BatchLLM(calls: Seq[LLMCall], resultAttrs: Seq[Attribute], child: LogicalPlan) extends UnaryNode {
  override def output: Seq[Attribute] = child.output ++ resultAttrs
  override def producedAttributes: AttributeSet = AttributeSet(resultAttrs)
  override protected def withNewChildInternal(newChild: LogicalPlan): BatchLLM = copy(child = newChild)
}

/** Pulls model calls out of any one-input node (Project, Filter, Aggregate, Sort...) into a [[BatchLLM]]
 *  below it, innermost calls first (a call inside another call's arguments gets its own node below). */
object ExtractLLMCalls extends Rule[LogicalPlan] {
  private def hasCall(e: Expression): Boolean = e.exists(_.isInstanceOf[LLMCall])

  override def apply(plan: LogicalPlan): LogicalPlan = plan.transformUp {
    case b: BatchLLM => b
    case node: UnaryNode if node.expressions.exists(hasCall) => extract(node)
  }

  private def extract(node: UnaryNode): LogicalPlan = {
    var current: UnaryNode = node
    var progress = true
    while (progress && current.expressions.exists(hasCall)) {
      val next = extractOnce(current)
      progress = next ne current
      current = next
    }
    // A Filter or Sort outputs its child's columns: keep the answers' columns out of its output.
    if (current.output.map(_.exprId) == node.output.map(_.exprId)) current else Project(node.output, current)
  }

  private def extractOnce(node: UnaryNode): UnaryNode = {
    val child = node.child
    val ready = mutable.LinkedHashMap.empty[Expression, LLMCall]
    node.expressions.foreach(_.foreach {
      case c: LLMCall if !hasCall(c.params) && c.params.references.subsetOf(child.outputSet) =>
        ready.getOrElseUpdate(c.canonicalized, c)
      case _ =>
    })
    if (ready.isEmpty) return node
    val calls = ready.values.toSeq
    val attrs = calls.map(c => AttributeReference(s"${c.model}_answer", c.dataType, nullable = true)())
    val byKey = ready.keys.zip(attrs).toMap
    node.withNewChildren(Seq(BatchLLM(calls, attrs, child))).transformExpressionsUp {
      case c: LLMCall if byKey.contains(c.canonicalized) => byKey(c.canonicalized)
    }.asInstanceOf[UnaryNode]
  }
}

/** Plans [[BatchLLM]] as [[BatchLLMExec]], reading the bridge's settings and each model's info once. */
case class LLMStrategy(settings: () => BridgeSettings, conf: String => Option[String]) extends SparkStrategy {
  override def apply(plan: LogicalPlan): Seq[SparkPlan] = plan match {
    case BatchLLM(calls, attrs, child) =>
      val s = settings()
      BatchLLMExec(calls, attrs, planLater(child), s, calls.map(c => ModelInfo.sizing(s, c.model, conf))) :: Nil
    case _ => Nil
  }
}

/** How a task sends one model's rows: rows per request, requests in flight. */
case class Sizing(batchSize: Int, concurrency: Int)

object ModelInfo {
  def sizing(s: BridgeSettings, model: String, conf: String => Option[String]): Sizing = {
    val info = try Transport.getJson(s, model, "info") catch {
      case e: BridgeRequestException if e.getMessage.contains("answered 404") || e.getMessage.contains("not deployed") =>
        throw Transport.notDeployed(s, model)
    }
    def num(key: String, default: Int): Int = Option(info.get(key)).map(_.toString.toDouble.toInt).getOrElse(default)
    val batch = conf(BridgeSettings.BatchSize).map(_.toInt).getOrElse(num("preferred_batch_size", 256))
    // As the Python side: enough requests in flight that all tasks together fill every worker slot.
    val slots = num("num_workers", 1) * num("worker_concurrency", 1)
    val parallelism = org.apache.spark.SparkContext.getOrCreate().defaultParallelism.max(1)
    val concurrency = conf(BridgeSettings.Concurrency).map(_.toInt)
      .getOrElse(math.max(2, (slots + parallelism - 1) / parallelism))
    require(batch >= 1, s"${BridgeSettings.BatchSize}=$batch: pass a number of rows >= 1")
    require(concurrency >= 1, s"${BridgeSettings.Concurrency}=$concurrency: pass a number >= 1")
    Sizing(batch, concurrency)
  }
}

/** Evaluates model calls over each partition: rows gathered into Arrow requests of `batchSize` rows,
 *  `concurrency` requests in flight per call, answers joined to their rows in input order. */
case class BatchLLMExec(calls: Seq[LLMCall], resultAttrs: Seq[Attribute], child: SparkPlan,
                        settings: BridgeSettings, sizing: Seq[Sizing]) extends UnaryExecNode {
  override def output: Seq[Attribute] = child.output ++ resultAttrs
  override def producedAttributes: AttributeSet = AttributeSet(resultAttrs)
  // SparkPlan.nodeName drops "Exec"; the full name is what EXPLAIN users search for.
  override def nodeName: String = "BatchLLMExec"
  override protected def withNewChildInternal(newChild: SparkPlan): BatchLLMExec = copy(child = newChild)

  override protected def doExecute(): RDD[InternalRow] = {
    val inputs = child.output
    val calls = this.calls
    val settings = this.settings
    val sizing = this.sizing
    val out = output
    child.execute().mapPartitions { rows =>
      val paramsOf = UnsafeProjection.create(calls.map(_.params), inputs)
      val project = UnsafeProjection.create(out, out)
      new BatchIterator(rows, calls, settings, sizing, paramsOf, project)
    }
  }
}

private[spark] object BatchIterator {
  private val threadIds = new AtomicInteger()
  private val factory: ThreadFactory = (r: Runnable) => {
    val t = new Thread(r, s"byzerllm-bridge-${threadIds.incrementAndGet()}")
    t.setDaemon(true)
    t
  }
}

private[spark] class BatchIterator(
    rows: Iterator[InternalRow], calls: Seq[LLMCall], settings: BridgeSettings, sizing: Seq[Sizing],
    paramsOf: UnsafeProjection, project: UnsafeProjection) extends Iterator[InternalRow] {
  private val batchSize = sizing.map(_.batchSize).min
  private val inFlight = sizing.map(_.concurrency).max
  private val pool: ExecutorService = Executors.newFixedThreadPool(inFlight * calls.size, BatchIterator.factory)
  Option(TaskContext.get()).foreach(_.addTaskCompletionListener[Unit](_ => pool.shutdownNow()))
  private val pending = new java.util.ArrayDeque[(Array[InternalRow], Int, Seq[Future[Array[Any]]])]()
  private var current: Array[InternalRow] = Array.empty
  private var currentAnswers: Seq[Array[Any]] = Nil
  private var n = 0
  private var pos = 0
  private val joined = new JoinedRow()
  private val answerRow = new GenericInternalRow(calls.size)

  private def fill(): Unit = {
    while (pending.size < inFlight && rows.hasNext) {
      val chunk = new Array[InternalRow](batchSize)
      val params = Array.fill(calls.size)(new Array[Array[Byte]](batchSize))
      var k = 0
      while (k < batchSize && rows.hasNext) {
        val row = rows.next()
        chunk(k) = row.copy()
        val p = paramsOf(row)
        var c = 0
        while (c < calls.size) {
          params(c)(k) = if (p.isNullAt(c)) null
            else if (calls(c).embedding) p.getUTF8String(c).getBytes // text or request JSON, as the Python side
            else ArrowCodec.asRequestJson(p.getUTF8String(c).getBytes)
          c += 1
        }
        k += 1
      }
      val size = k
      val futures = calls.indices.map { c =>
        val call = calls(c)
        val rowsOfCall = params(c)
        pool.submit(() => answer(call, rowsOfCall, size))
      }
      pending.add((chunk, size, futures))
    }
  }

  private def answer(call: LLMCall, params: Array[Array[Byte]], size: Int): Array[Any] =
    if (call.embedding) embed(call, params, size) else chat(call, params, size)

  /** As the Python side's `run_embeddings`: a failed request fails the query; a row's error fails it too
   *  unless `fail_on_error` is false, which leaves that row null. */
  private def embed(call: LLMCall, params: Array[Array[Byte]], size: Int): Array[Any] = {
    val (vectors, errors) = ArrowCodec.decodeEmbeddings(
      Transport.postArrow(settings, call.model, ArrowCodec.encode(params, size), "embed"), size)
    if (call.failOnError) errors.find(_ != null).foreach { e =>
      throw new SparkException(s"model '${call.model}' could not embed a row ($e). Call it with fail_on_error " +
        "false (its second argument) to get null for such rows instead of failing the query.")
    }
    vectors.asInstanceOf[Array[Any]]
  }

  private def chat(call: LLMCall, params: Array[Array[Byte]], size: Int): Array[Any] = {
    val body = ArrowCodec.encode(params, size)
    val result = new Array[Any](size)
    val answers = try ArrowCodec.decode(Transport.postArrow(settings, call.model, body), size, !call.failOnError) catch {
      case e: BridgeRequestException if !call.failOnError && !e.getMessage.contains("is not deployed") =>
        // The request failed after its retries: every non-null row gets the error.
        val msg = UTF8String.fromString(e.getMessage)
        var i = 0
        while (i < size) {
          if (params(i) != null) result(i) = InternalRow(null, msg, null)
          i += 1
        }
        return result
    }
    var i = 0
    while (i < size) {
      val (r, e, m) = (answers.response(i), answers.error(i), answers.metadata(i))
      if (call.failOnError) {
        if (e != null) throw new SparkException(
          s"model '${call.model}' could not answer a row ($e); request: " +
            s"${new String(params(i), java.nio.charset.StandardCharsets.UTF_8).take(300)}. Call it with " +
            "fail_on_error false (its second argument) to get per-row errors instead of failing the query.")
        result(i) = r
      } else if (r != null || e != null || m != null) {
        result(i) = InternalRow(r, e, m)
      }
      i += 1
    }
    result
  }

  override def hasNext: Boolean = pos < n || { fill(); !pending.isEmpty }

  override def next(): InternalRow = {
    if (pos >= n) {
      fill()
      val (chunk, size, futures) = pending.poll()
      current = chunk
      n = size
      pos = 0
      currentAnswers = futures.map { f =>
        try f.get() catch {
          case e: java.util.concurrent.ExecutionException => throw e.getCause
        }
      }
      fill() // keep the window full while this chunk's rows are consumed
    }
    var c = 0
    while (c < calls.size) {
      answerRow.update(c, currentAnswers(c)(pos))
      c += 1
    }
    val row = project(joined(current(pos), answerRow))
    current(pos) = null
    pos += 1
    row
  }
}
