package tech.byzer.llm.spark

import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import org.apache.spark.SparkContext
import org.apache.spark.sql.SparkSessionExtensions
import org.apache.spark.sql.catalyst.FunctionIdentifier
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions._
import org.apache.spark.sql.catalyst.expressions.codegen.CodegenFallback
import org.apache.spark.sql.catalyst.util.ArrayData
import org.apache.spark.sql.internal.SQLConf
import org.apache.spark.sql.types._
import org.apache.spark.unsafe.types.UTF8String
import org.slf4j.LoggerFactory

/** `--conf spark.sql.extensions=tech.byzer.llm.spark.ByzerLLMExtensions`: the SQL functions of the Python
 *  side for JVM-only Spark (spark-sql, the Thrift server, Scala and Java jobs).
 *
 *  - `llm_param(map)`, `llm_prompt(template, array)`, `llm_result(x)`: as in a PySpark session.
 *  - One function per deployed model, named by its `udf_name` (else the model name), read from the
 *    endpoint when a session starts; `SELECT byzerllm_refresh()` reads them again.
 *  - `llm_call(model, params [, fail_on_error])`: any deployed model by name.
 *  - Every model function takes an optional second argument `fail_on_error` (default true); false
 *    returns `struct<response, error, metadata>`.
 *  - An optimizer rule moves the calls into a batch operator ([[BatchLLMExec]]) that sends Arrow
 *    requests to `POST {endpoint}/{model}/arrow`, several in flight per task. */
class ByzerLLMExtensions extends (SparkSessionExtensions => Unit) {
  override def apply(ext: SparkSessionExtensions): Unit = {
    ext.injectOptimizerRule(_ => ExtractLLMCalls)
    ext.injectPlannerStrategy(_ => LLMStrategy(() => Functions.sessionSettings(), Functions.sessionConf))
    Functions.fixed.foreach(ext.injectFunction)
    Functions.modelsAtStart().foreach(ext.injectFunction)
  }
}

object Functions {
  private val log = LoggerFactory.getLogger(classOf[ByzerLLMExtensions])
  type Builder = Seq[Expression] => Expression
  type Entry = (FunctionIdentifier, ExpressionInfo, Builder)

  def sessionConf(key: String): Option[String] = Option(SQLConf.get.getConfString(key, null))
  def sessionSettings(): BridgeSettings = BridgeSettings.from(sessionConf)

  private def info(name: String, usage: String) =
    new ExpressionInfo(classOf[ByzerLLMExtensions].getName, null, name, usage, "")

  private def entry(name: String, usage: String)(builder: Builder): Entry =
    (FunctionIdentifier(name), info(name, usage), builder)

  private def arity(name: String, args: Seq[Expression], allowed: Range): Unit =
    if (!allowed.contains(args.size)) throw new IllegalArgumentException(
      s"$name takes ${allowed.mkString(" or ")} arguments, got ${args.size}")

  private def failOnError(name: String, arg: Option[Expression]): Boolean = arg match {
    case None => true
    case Some(e) if e.foldable && (e.dataType == BooleanType || e.dataType == StringType) =>
      e.eval() match {
        case b: java.lang.Boolean => b
        case s: UTF8String if Set("true", "false").contains(s.toString.toLowerCase) => s.toString.toLowerCase == "true"
        case other => throw new IllegalArgumentException(
          s"$name: fail_on_error must be true or false, got $other")
      }
    case Some(e) => throw new IllegalArgumentException(
      s"$name: fail_on_error must be a literal true or false, got ${e.sql}")
  }

  def modelFunction(model: String, embedding: Boolean)(args: Seq[Expression]): Expression = {
    arity(model, args, 1 to 2)
    LLMCall(model, args.head, failOnError(model, args.lift(1)), embedding)
  }

  /** The model's info (`GET {endpoint}/{model}/info`), None when the endpoint does not answer. */
  private def modelInfo(s: BridgeSettings, model: String): Option[java.util.Map[String, AnyRef]] =
    try Some(Transport.getJson(s, model, "info")) catch { case NonFatal(_) => None }

  private def isEmbedding(info: Option[java.util.Map[String, AnyRef]]): Boolean =
    info.flatMap(i => Option(i.get("embedding"))).exists(_.toString.toBoolean)

  val fixed: Seq[Entry] = Seq(
    entry("llm_param", "llm_param(map) - the request as JSON text, as the PySpark side's llm_param") { args =>
      arity("llm_param", args, 1 to 1)
      StructsToJson(Map.empty[String, String], Cast(args.head, MapType(StringType, StringType)))
    },
    entry("llm_prompt", "llm_prompt(template, array) - the template with {0}, {1}... filled in") { args =>
      arity("llm_prompt", args, 2 to 2)
      LLMPrompt(args(0), Cast(args(1), ArrayType(StringType)))
    },
    entry("llm_result", "llm_result(x) - the answer text of a model function's result (text or struct)") { args =>
      arity("llm_result", args, 1 to 1)
      args.head.dataType match {
        case StringType => args.head
        case s: StructType if s.fieldNames.contains("response") =>
          GetStructField(args.head, s.fieldIndex("response"), Some("response"))
        case other => throw new IllegalArgumentException(
          s"llm_result takes the text or struct a model function returns, not ${other.simpleString}")
      }
    },
    entry("llm_call", "llm_call(model, params [, fail_on_error]) - call the deployed model by name") { args =>
      arity("llm_call", args, 2 to 3)
      val model = args.head match {
        case e if e.foldable && e.dataType == StringType && e.eval() != null => e.eval().toString
        case e => throw new IllegalArgumentException(s"llm_call: the model name must be a string literal, got ${e.sql}")
      }
      // An embedding model is called on its embed route: its info says which (an unknown model is
      // refused when the query is planned, naming the deployed ones).
      LLMCall(model, args(1), failOnError("llm_call", args.lift(2)), isEmbedding(modelInfo(sessionSettings(), model)))
    },
    entry("byzerllm_refresh", "byzerllm_refresh() - read the deployed models again; their SQL function names") { args =>
      arity("byzerllm_refresh", args, 0 to 0)
      Literal(UTF8String.fromString(refresh().mkString(",")), StringType)
    }
  )

  /** (SQL function name, model, computes embeddings) of each deployed model: its `udf_name` when its info
   *  gives one. */
  def deployed(s: BridgeSettings): Seq[(String, String, Boolean)] = Transport.deployedModels(s).map { model =>
    val info = modelInfo(s, model)
    val name = info.flatMap(i => Option(i.get("udf_name"))).map(_.toString)
    (name.filter(_.nonEmpty).getOrElse(model), model, isEmbedding(info))
  }

  private def modelEntry(name: String, model: String, embedding: Boolean): Entry =
    entry(name, s"$name(params [, fail_on_error]) - call the deployed model '$model'" +
      (if (embedding) " (its embeddings, array<float>)" else ""))(modelFunction(model, embedding))

  /** Read when the extension is applied (each new SparkSession): the settings of the SparkContext. */
  def modelsAtStart(): Seq[Entry] = {
    val conf = SparkContext.getOrCreate().getConf
    val found = try deployed(BridgeSettings.from(k => conf.getOption(k))) catch {
      case NonFatal(e) =>
        log.warn(s"byzerllm: no model functions registered at session start (${e.getMessage}); " +
          "llm_call(model, ...) and SELECT byzerllm_refresh() still work once the endpoint answers")
        Nil
    }
    val builtin = fixed.map(_._1.funcName).toSet
    found.filterNot(f => builtin.contains(f._1)).map { case (name, model, embedding) => modelEntry(name, model, embedding) }
  }

  /** Registers the deployed models' functions in the current session; their names. */
  def refresh(): Seq[String] = {
    val registry = org.apache.spark.sql.classic.SparkSession.active.sessionState.functionRegistry
    deployed(sessionSettings()).map { case (name, model, embedding) =>
      val (id, exprInfo, builder) = modelEntry(name, model, embedding)
      registry.createOrReplaceTempFunction(name, builder, "scala_udf")
      name
    }
  }
}

/** `llm_prompt(template, array)`: `{0}`, `{1}`... replaced by the array's items (null items by ''); a null
 *  array leaves the template as it is; a null template gives null (as `fill_prompt` in Python). */
case class LLMPrompt(template: Expression, args: Expression) extends BinaryExpression with CodegenFallback {
  override def left: Expression = template
  override def right: Expression = args
  override def dataType: DataType = StringType
  override def nullable: Boolean = true
  override def prettyName: String = "llm_prompt"
  override def eval(input: InternalRow): Any = {
    val t = template.eval(input)
    if (t == null) return null
    var text = t.toString
    val items = args.eval(input).asInstanceOf[ArrayData]
    if (items != null) {
      var i = 0
      while (i < items.numElements()) {
        val v = if (items.isNullAt(i)) "" else items.getUTF8String(i).toString
        text = text.replace(s"{$i}", v)
        i += 1
      }
    }
    UTF8String.fromString(text)
  }
  override protected def withNewChildrenInternal(l: Expression, r: Expression): LLMPrompt = copy(l, r)
}
